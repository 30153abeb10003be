"""The one error type users see: a clear message naming the problem and the fix (CLI exit code 2),
and the wording of the operating system's errors (full disk, read-only folder, ...) in those terms."""

from __future__ import annotations

import errno
import os


class HsaeError(Exception):
    """Bad input or an impossible request. The message says what is wrong and how to fix it."""

    exit_code = 2


class HsaeWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


# errno -> (the cause in words, the fix). Codes missing on a platform are skipped.
_OS_CAUSES: dict[int, tuple[str, str]] = {
    code: words
    for name, words in {
        "ENOSPC": ("no space left on the device", "free some space or write to another disk"),
        "EDQUOT": ("the disk quota is exceeded", "free some space or write to another disk"),
        "EROFS": ("the file system is read-only", "choose a folder on a writable disk"),
        "EACCES": ("permission denied", "choose a folder you can write to, or fix its permissions"),
        "EPERM": ("the operation is not permitted", "choose a folder you can write to, or fix its permissions"),
        "ENOENT": ("no such file or folder", "check the path"),
        "ENOTDIR": ("a part of the path is a file, not a folder", "check the path"),
        "EISDIR": ("it is a folder, not a file", "check the path"),
        "EEXIST": ("something of that name is already there", "remove it or choose another path"),
        "EMFILE": ("too many files are open", "raise the limit (ulimit -n) or close other programs"),
        "ENAMETOOLONG": ("the name is too long", "choose a shorter path"),
        "EIO": ("the device reported an input/output error", "check the disk"),
    }.items()
    if (code := getattr(errno, name, None)) is not None
}


def os_error_message(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an operating-system error: the path, the cause and the fix. `path` names the
    file hsae meant (an atomic write's target rather than its temporary file)."""
    where = path if path is not None else err.filename
    cause, fix = _OS_CAUSES.get(err.errno or 0, (err.strerror or str(err) or type(err).__name__, "check the path"))
    return f"{where}: {cause}; {fix}" if where is not None else f"{cause}; {fix}"


def os_error(err: OSError, path: str | os.PathLike | None = None, action: str = "cannot write") -> HsaeError:
    """`err` as an HsaeError: "<action> <path>: <cause>; <fix>"."""
    return HsaeError(f"{action} {os_error_message(err, path)}")
