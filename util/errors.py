"""User errors and how the command-line tools report them.

A :class:`UserError` is a problem the user can fix (a bad config key or value, bad data, a
bad checkpoint, a missing file). Its message is one paragraph: what is wrong, which file or
key, and how to fix it. The command-line tools print it without a traceback and exit with
:attr:`UserError.exit_code` (2 for usage errors, 1 otherwise); ``--debug`` or the
environment variable ``MAMBAAD_DEBUG=1`` shows the traceback as well. Anything that is not a
user error is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback


class UserError(Exception):
    """A problem in the user's input; the message says what, where and how to fix it."""

    exit_code = 1


class UsageError(UserError):
    """A wrong command line or config (exit status 2, the shell convention for usage errors)."""

    exit_code = 2


class DiskFullError(UserError, OSError):
    """No space left on the device while writing a file; earlier files are intact."""

    def __init__(self, path: str | os.PathLike[str], intact: str = "") -> None:
        message = f"no space left on device while writing {path}"
        super().__init__(errno.ENOSPC, message + (f"; {intact}" if intact else ""))

    def __str__(self) -> str:
        return str(self.args[1])


class UnwritableError(UserError):
    """A folder the command must write cannot be created or written (read-only file system, no
    permission, a file in the way)."""


def make_folder(path: str | os.PathLike[str], what: str) -> None:
    """Create the folder ``path`` (and its parents) if needed; an unwritable place raises
    :class:`UnwritableError` naming ``what`` (the config key or option that chose it)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise unwritable(path, what, err) from err


def unwritable(path: str | os.PathLike[str], what: str, err: OSError) -> UnwritableError:
    """The one-paragraph error for ``err`` raised while creating or writing ``path`` (chosen by ``what``)."""
    reason = err.strerror or type(err).__name__
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return UnwritableError(
        f"{what}={path} cannot be written: {reason}{where}. Choose a folder you may write to "
        f"(not on a read-only disk, and no file of that name on the way), e.g. {what}=./out"
    )


def write_failure(
    err: BaseException, path: str | os.PathLike[str], what: str, intact: str = ""
) -> UserError | None:
    """The user error for ``err`` raised while writing under ``path`` (chosen by ``what``): disk
    full, or a place that cannot be written; None when ``err`` is something else."""
    if is_disk_full(err):
        return DiskFullError(getattr(err, "filename", None) or path, intact)
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return unwritable(path, what, err)
    return None


def is_disk_full(err: BaseException) -> bool:
    """True for an ``ENOSPC`` error, also when PyTorch's archive writer wraps it in a RuntimeError."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or ("inline_container" in text and "writ" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``MAMBAAD_DEBUG`` set to a true value."""
    flag = os.environ.get("MAMBAAD_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or "--debug" in (argv if argv is not None else sys.argv[1:])


def report(err: BaseException, debug: bool = False, log: logging.Logger | None = None) -> int:
    """Print ``err`` for a person (one paragraph for user errors) and return the exit status.

    ``log`` (the run's logger, when a run folder exists) gets the message and the traceback
    in its files only (``log.txt``), so that the run folder says why the run ended.
    """
    user = isinstance(err, UserError)
    text = f"error: {err}" if user else f"error: {type(err).__name__}: {err}"
    tb = "".join(traceback.format_exception(err)).rstrip()
    if log is not None:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s\n%s", (text, tb), None)
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    print(tb if debug or not user else text, file=sys.stderr)
    return err.exit_code if user else 1
