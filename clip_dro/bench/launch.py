"""Starting a Python entry point (``clip-dro`` by default) in one process or under torchrun, as the fault
benchmark and the tests do: one rule for the rendezvous port, one environment (a thread per process, since
the processes share the CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Optional

CLI = ["-m", "clip_dro.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def command(args: list[str], nproc: int = 1, entry: Optional[list[str]] = None) -> list[str]:
    """``python ENTRY ARGS`` in one process, or under torchrun with ``nproc`` processes on a free port.
    ``entry`` is what follows ``python``: ``-m module`` or a script path (default: ``clip-dro``)."""
    entry = CLI if entry is None else entry
    if nproc == 1:
        return [sys.executable, *entry, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *entry, *args]


def run(args: list[str], nproc: int = 1, entry: Optional[list[str]] = None, timeout: float = 600,
        env: Optional[dict[str, str]] = None, **kw) -> subprocess.CompletedProcess:
    """Run :func:`command` to its end, its output captured as text."""
    return subprocess.run(command(args, nproc, entry), env=env or environment(), capture_output=True, text=True,
                          timeout=timeout, **kw)
