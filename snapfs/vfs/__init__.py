"""snapfs.vfs"""
