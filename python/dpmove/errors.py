"""Exceptions raised by dpmove.

Every OS or driver failure is a :class:`Error` (an :class:`OSError`) that keeps ``errno``, a
message saying what was being done (request, entry, path, offset) and ``filename``. Misuse
(bad shapes, sizes, alignment, closed objects) raises :class:`ValueError` or :class:`TypeError`
saying what was expected.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "Error",
    "TransferError",
    "TimedOut",
    "Cancelled",
    "UnsupportedOperation",
    "NotFound",
    "PermissionDenied",
]


class Error(OSError):
    """An OS-level failure inside dpmove; ``errno`` is the cause, ``strerror`` the context."""

    def __init__(self, code: int, message: str, filename: str | None = None):
        if filename is None:
            super().__init__(code, message)
        else:
            super().__init__(code, message, filename)

    def __str__(self) -> str:  # keep the errno name visible: "[Errno 5 EIO] ..."
        name = _errno.errorcode.get(self.errno, "?") if self.errno else "?"
        return f"[Errno {self.errno} {name}] {self.strerror}"


class TransferError(Error):
    """A request ended FAILED: some entry failed or a read reached end of file.

    ``errno`` is the first failed entry's errno (``ENODATA`` for a short read at end of file);
    the request's ``status`` and ``bytes`` arrays say what happened to every entry.
    """


class TimedOut(Error, TimeoutError):
    """A request's deadline passed before every entry finished."""


class Cancelled(Error):
    """A request was cancelled before every entry finished."""


class UnsupportedOperation(Error, ValueError):
    """The object does not allow this operation (e.g. writing a file opened read-only)."""


class NotFound(Error, FileNotFoundError):
    """A path does not exist."""


class PermissionDenied(Error, PermissionError):
    """The OS refused access (EACCES / EPERM)."""


_KIND = {
    "transfer": TransferError,
    "timed_out": TimedOut,
    "cancelled": Cancelled,
    "unsupported": UnsupportedOperation,
}


def from_core(kind: str, code: int, message: str, filename: str | None) -> Error:
    """Builds the exception for a failure reported by the native core (used by ``_core``)."""
    cls = _KIND.get(kind)
    if cls is None:
        if code == _errno.ENOENT:
            cls = NotFound
        elif code in (_errno.EACCES, _errno.EPERM):
            cls = PermissionDenied
        else:
            cls = Error
    return cls(code, message, os.fsdecode(filename) if filename is not None else None)
