"""One writer per directory (a training run directory, a prep output directory): an advisory lock that the
kernel releases when its process ends, however it ends (kill -9 included), so a crashed writer never leaves
it stuck and a rerun resumes."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Callable

from clip_dro.errors import UserError

LOCK_FILE = ".lock"


class DirectoryBusy(UserError):
    """Another live process is writing into the same directory."""


class RunDirBusy(DirectoryBusy):
    """Another live run is training into the same directory."""


class PrepDirBusy(DirectoryBusy):
    """Another live prep is writing into the same output directory."""


def _lock(directory: Path, busy: Callable[[str], DirectoryBusy]) -> IO:
    """Take ``directory``'s lock or raise ``busy(holder)``; keep the returned file open for as long as the
    writing lasts (closing it, or the process ending, releases the lock)."""
    path = directory / LOCK_FILE
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise busy(holder) from None
        try:  # a holder that removed the file as we opened it left us a lock on a file nobody else sees
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def lock_run_dir(run_dir: Path) -> IO:
    """The run directory's lock, or RunDirBusy naming its holder."""
    return _lock(run_dir, lambda holder: RunDirBusy(
        f"train.output_dir {run_dir} is in use by a run that is still going ({holder}); wait for it to end or "
        "choose another train.output_dir"))


def lock_prep_dir(output: Path) -> IO:
    """The prep output directory's lock, or PrepDirBusy naming its holder. ``unlock_prep_dir`` removes the
    lock file when the prep is over, so that the finished directory holds only the dataset."""
    return _lock(output, lambda holder: PrepDirBusy(
        f"output {output} is being written by another prep that is still going ({holder}); wait for it to end "
        "(rerunning the same command afterwards resumes or finds it done) or choose another --output"))


def unlock_prep_dir(output: Path, handle: IO) -> None:
    """Remove the lock file, then release the lock (in this order: a prep that opened the file meanwhile
    finds it gone after taking the lock, and takes a new one)."""
    (output / LOCK_FILE).unlink(missing_ok=True)
    handle.close()
