"""Chunk storage: append-only pack files, checksums and the repository directory."""
