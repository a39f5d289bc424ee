"""snapfs.cli"""
