"""Errors that reach a user.

Every error a user can cause or meet is a subclass of :class:`SnapfsError` that carries
the process exit code and an errno for the FUSE layer, so that the CLI prints one clear
line and exits, and the filesystem answers with the errno a local filesystem would give.
Anything else escaping is a bug.
"""

from __future__ import annotations

import errno as _errno


class SnapfsError(Exception):
    """Base class: a message meant for the user, an exit code and an errno."""

    exit_code = 1
    errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class UsageError(SnapfsError):
    """The command line or an argument is wrong."""

    exit_code = 2
    errno = _errno.EINVAL


class NotARepository(SnapfsError):
    """A path is neither a repository nor inside a snapfs mount."""

    exit_code = 3
    errno = _errno.ENOENT


class RepositoryLocked(SnapfsError):
    """Another process (a mount or a writer) holds the repository."""

    exit_code = 4
    errno = _errno.EBUSY


class FormatError(SnapfsError):
    """The repository was written by an incompatible version or is damaged beyond use."""

    exit_code = 5


class IntegrityError(SnapfsError):
    """Stored data failed its checksum or authentication: never return it as data."""

    exit_code = 6
    errno = _errno.EIO


class NotFound(SnapfsError):
    """A volume, snapshot or path does not exist."""

    exit_code = 7
    errno = _errno.ENOENT


class AlreadyExists(SnapfsError):
    exit_code = 8
    errno = _errno.EEXIST


class Refused(SnapfsError):
    """The operation is understood but not allowed in this state (busy, read-only...)."""

    exit_code = 9
    errno = _errno.EPERM


class DaemonError(SnapfsError):
    """The running daemon could not be reached or answered with an error."""

    exit_code = 10


class FsError(SnapfsError):
    """A POSIX error from the vfs layer: carries the errno the kernel should see."""

    exit_code = 11

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)), errno=errno)


class DiskFull(SnapfsError):
    """The file system holding the repository has no room left for what must be written."""

    exit_code = 12
    errno = _errno.ENOSPC


def fs_error(code: int) -> FsError:
    return FsError(code)


SQLITE_FULL = 13


def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, whichever layer met it: a pack append (ENOSPC, EDQUOT) or a
    catalog commit (SQLITE_FULL). Expected, not a bug: answered with ENOSPC."""
    if isinstance(e, OSError):
        return e.errno in (_errno.ENOSPC, _errno.EDQUOT)
    return getattr(e, "sqlite_errorcode", None) == SQLITE_FULL
