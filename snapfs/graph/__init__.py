"""snapfs.graph"""
