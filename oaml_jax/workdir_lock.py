"""One training run per workdir: a lease file that a killed run does not leave stuck.

Two train.py processes on one workdir would interleave their checkpoints (one run's step 48 silently
replacing the other's). The run's process 0 holds `<workdir>/lock.json` {"owner", "host", "pid",
"heartbeat"} and rewrites its heartbeat while it trains. A second run finds it and stops, naming the
holder. A lock is stale, and taken over with a warning, when its holder is a process of this host that no
longer exists, or when its heartbeat is older than `ttl_s` (a holder on another host that was killed).
The file goes through epath, so it works on gs:// workdirs as on local disks and NFS (object stores have
no OS file locks, hence a lease rather than flock).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Optional

from absl import logging
from etils import epath

LOCK_FILE = "lock.json"


class WorkdirBusyError(OSError):
    """Another live run holds the workdir's lock (an OSError, EBUSY: the command lines report it in one line)."""


def not_writable(workdir: epath.Path, error: OSError) -> OSError:
    """The one-line error for a workdir that cannot be created or written (read-only disk, no permission)."""
    reason = error.strerror or str(error) or type(error).__name__
    return OSError(f"workdir {workdir} cannot be written ({reason}): training writes its lock, "
                   "checkpoints and summaries there; choose a --workdir you can write")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """The lease of one run on a workdir (use from process 0 only)."""

    def __init__(self, workdir: epath.Path, *, ttl_s: float = 120.0, heartbeat_s: float = 20.0):
        """Args:
            workdir: the run's workdir (created by the caller).
            ttl_s: a heartbeat older than this marks the holder dead (holders on other hosts).
            heartbeat_s: how often `refresh` rewrites the heartbeat.
        """
        self.path = workdir / LOCK_FILE
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._last_beat = 0.0

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            logging.warning("%s is not a lock file this version wrote (%s); taking it over", self.path, e)
            return None

    def _stale_reason(self, held: dict) -> Optional[str]:
        age = time.time() - float(held.get("heartbeat", 0.0))
        if held.get("host") == self.record["host"] and not _process_exists(int(held.get("pid", -1))):
            return f"its process {held.get('pid')} on this host no longer exists"
        if age > self.ttl_s:
            return f"its last heartbeat is {age:.0f} s old (> {self.ttl_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Takes the lock, or raises.

        Raises:
            WorkdirBusyError: a live run holds it (host, pid and heartbeat age named).
            OSError: the lock cannot be written (`not_writable`'s message).
        """
        held = self._read()
        if held is not None and held.get("owner") != self.record["owner"]:
            reason = self._stale_reason(held)
            if reason is None:
                age = time.time() - float(held.get("heartbeat", 0.0))
                if held.get("host") == self.record["host"]:
                    takeover = (f"process {held.get('pid')} on this host is still running: stop it, or wait for it "
                                "to end (its lock is then taken over at once)")
                else:
                    takeover = (f"a killed run's lock is taken over once its heartbeat is older than "
                                f"{self.ttl_s:.0f} s")
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by another training run (host {held.get('host')}, pid "
                    f"{held.get('pid')}, heartbeat {age:.0f} s ago; lock {self.path}). Two runs on one workdir "
                    f"would overwrite each other's checkpoints: choose another --workdir, or {takeover}.")
            logging.warning("taking over the stale lock %s of host %s pid %s: %s", self.path, held.get("host"),
                            held.get("pid"), reason)
        try:
            self._write()
        except OSError as e:
            raise not_writable(self.path.parent, e) from e

    def _write(self) -> None:
        self._last_beat = time.time()
        self.path.write_text(json.dumps(dict(self.record, heartbeat=self._last_beat)))

    def refresh(self) -> None:
        """Rewrites the heartbeat when `heartbeat_s` has passed (cheap to call every step)."""
        if time.time() - self._last_beat >= self.heartbeat_s:
            self._write()

    def release(self) -> None:
        """Removes the lock if it is still this run's."""
        held = self._read()
        if held is not None and held.get("owner") == self.record["owner"]:
            self.path.unlink()
