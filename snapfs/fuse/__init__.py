"""snapfs.fuse"""
