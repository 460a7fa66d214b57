"""One run per run directory: an advisory lock that the kernel releases when its process ends, however it
ends (kill -9 included), so a crashed run never leaves it stuck."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from clip_dro.errors import UserError

LOCK_FILE = ".lock"


class RunDirBusy(UserError):
    """Another live run is training into the same directory."""


def lock_run_dir(run_dir: Path) -> IO:
    """Take ``run_dir``'s lock or raise RunDirBusy naming its holder; keep the returned file open for as long
    as the run lasts (closing it, or the process ending, releases the lock)."""
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirBusy(f"train.output_dir {run_dir} is in use by a run that is still going ({holder}); wait for "
                         "it to end or choose another train.output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle

