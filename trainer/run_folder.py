"""The run folder's life cycle: creation, an exclusive lock, and a status file.

``status.json`` says whether a run is ``running``, ``finished``, ``interrupted`` (resumable)
or ``failed`` (with the error), so that a folder left by a crash never looks like a finished
run. ``.lock`` is held (``flock``) by the one process that trains in the folder: a second
process resuming the same folder is refused, and the kernel releases the lock of a process
that died, so a stale lock never blocks anyone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from util.config import BaseConfig, ConfigError, config_to_dict, diff_configs, flat_keys, save_config
from util.errors import DiskFullError, UserError, is_disk_full, unwritable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is then not protected
    fcntl = None

# config keys that may differ on resume: not at all part of the run / changeable with trainer.resume_changes
IGNORED_ON_RESUME = (
    "trainer.resume",
    "trainer.dist_timeout",
    "data.num_workers",
    "device",
    "output_dir",
    "config_file",
)
SAFE_ON_RESUME = (
    "trainer.epochs",
    "trainer.test_every",
    "trainer.save_every",
    "trainer.save_every_steps",
    "trainer.keep_checkpoints",
    "trainer.log_every",
    "trainer.amp_eval",
    "data.batch_size_test",
    "data.cache",
    "evaluator.",
    "vis",
)
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
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(run_dir) from err
            raise unwritable(output_dir, "output_dir", err) from err


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


def check_resumable(run_dir: Path, main: bool = True) -> None:
    """Refuse ``trainer.resume=run_dir`` unless it is the folder of an earlier training (``ckpt.pth``).

    A run folder without a checkpoint belongs to a run that died before its first one (killed, out
    of memory): nothing can be resumed. If its ``status.json`` still says ``running`` and no
    process holds its lock, it is marked ``failed`` with that reason (by the ``main`` rank only).
    """
    if not (run_dir / "ckpt.pth").is_file() and (run_dir / "config.json").is_file():
        reason = "it stopped before its first checkpoint, so there is nothing to resume"
        if main and (read_status(run_dir) or {}).get("state") == "running":
            try:
                lock = RunLock(run_dir).acquire()
            except RunFolderBusyError:
                reason = "it is still running and has not written its first checkpoint yet"
            else:
                write_status(run_dir, "failed", error=f"{reason}; start the run again")
                lock.release()
        raise ConfigError(f"trainer.resume={run_dir}: {reason}; start the run again without trainer.resume")
    if not (run_dir / "ckpt.pth").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no ckpt.pth"
        raise ConfigError(
            f"trainer.resume={run_dir} {what}; pass the run folder of an earlier training "
            f"(runs/<config>_<timestamp>, the folder that holds ckpt.pth)"
        )


def check_resume_config(cfg: BaseConfig, run_dir: Path, log: logging.Logger, write: bool = True) -> None:
    """Refuse a resume whose effective config differs from the saved run's.

    With ``trainer.resume_changes=True`` the keys in :data:`SAFE_ON_RESUME` may change
    (recorded, when ``write`` (rank 0), in ``resume_changes.json`` and ``config.json``); values
    derived from them keep the saved run's (the checkpoint's scheduler holds those).
    """
    path = run_dir / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    now = config_to_dict(cfg)
    old, new = flat_keys(saved), flat_keys(now)
    changed = [
        k
        for k in diff_configs(saved, now)
        if not k.startswith(IGNORED_ON_RESUME)
        # a key added to (or removed from) the project since the run was saved, not set by the user
        and not ((k not in old or k not in new) and k not in cfg.overridden)
    ]
    if not changed:
        return
    listing = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    explicit = [k for k in changed if k in cfg.overridden]
    unsafe = [k for k in explicit if not k.startswith(SAFE_ON_RESUME)]
    if not cfg.trainer.resume_changes or unsafe:
        raise ConfigError(
            f"trainer.resume={run_dir}: the config differs from the saved run ({listing}). Resume with "
            f"the overrides of the original run (see {path}); only "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in SAFE_ON_RESUME)} may change, "
            f"with trainer.resume_changes=True" + (f" ({', '.join(unsafe)} cannot)" if unsafe else "")
        )
    for key in changed:
        if key not in explicit:  # derived from a changed key: the checkpoint keeps the saved value
            parent = cfg
            *sections, leaf = key.split(".")
            for name in sections:
                parent = getattr(parent, name)
            value = old.get(key)
            setattr(parent, leaf, tuple(value) if isinstance(getattr(parent, leaf), tuple) else value)
    applied = {k: [old.get(k), new.get(k)] for k in explicit}
    if write:
        record = run_dir / "resume_changes.json"
        history = json.loads(record.read_text()) if record.is_file() else []
        history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": applied})
        record.write_text(json.dumps(history, indent=2, default=str) + "\n")
        save_config(cfg, path)
    log.warning(
        "resuming with changed config values (recorded in resume_changes.json): %s",
        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in applied.items()),
    )
