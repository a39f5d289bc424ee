"""snapfs.crypto"""
