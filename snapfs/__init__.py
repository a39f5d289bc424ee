"""snapfs: every snapshot of a tree as a read-write directory, over a copy-on-write chunk store."""

__version__ = "0.1.0"
# 2: chunk identities are keyed BLAKE3 (format 1, still read: HMAC-SHA256)
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
