"""The run folder's life cycle: creation, an exclusive lock, and a status file.

``status.json`` says whether a run is ``running``, ``finished``, ``interrupted`` (resumable)
or ``failed`` (with the error), so that a folder left by a crash never looks like a finished
run. ``.lock`` is held (``flock``) by the one process that trains in the folder: a second
process resuming the same folder is refused, and the kernel releases the lock of a process
that died, so a stale lock never blocks anyone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from util.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is then not protected
    fcntl = None

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


class RunFolderBusyError(UserError):
    """Another live process holds the run folder's lock."""


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create and return ``<output_dir>/<name>_<timestamp>[-n]`` (never an existing folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(output_dir) / f"{name}_{stamp}"
    n = 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = Path(output_dir) / f"{name}_{stamp}-{n}"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``run_dir/.lock`` holding the owner's pid and host."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: Any = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusyError` naming the process that holds it."""
        if fcntl is None:
            return self
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusyError(
                f"run folder {self.path.parent} is in use by {owner}; wait until it ends or stop it "
                f"before resuming (two processes writing one run folder would mix their checkpoints)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%c')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process ends)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def write_status(run_dir: str | Path, state: str, **extra: Any) -> bool:
    """Atomically record ``state`` (running, finished, interrupted, failed) and details.

    Best effort: on a full disk the status cannot be written, and the error being reported
    matters more, so an ``OSError`` here returns False instead of raising.
    """
    path = Path(run_dir) / STATUS_FILE
    payload = {"state": state, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), **extra}
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded status, or None for folders written before status files existed."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
