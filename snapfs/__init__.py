"""snapfs: every snapshot of a tree as a read-write directory, over a copy-on-write chunk store."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
