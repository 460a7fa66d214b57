"""How the processes of a run or of an evaluation work together (design.md §5): joining the launch, gathers and
sums of tensors, agreements, and a dead or hung peer reported in one line.

A function that says it is a collective must be called by every process, in the same order. Without
torch.distributed (one process) every one of them is the identity. The collectives go through
``torch.distributed``'s module attributes (``dist.all_gather``), so that a benchmark can count them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import Tensor

from clip_dro.errors import UserError, first_line

T = TypeVar("T")

# Newer torch raises DistError subclasses; gloo and NCCL transport errors still arrive as plain RuntimeErrors
# that name their library, which is the only way to tell them apart.
_TRANSPORTS = ("gloo", "NCCL", "ProcessGroup")


# -- the launch ---------------------------------------------------------------------------------------------

def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_processes(collective_timeout_s: int) -> PartialState:
    """This process's place in its launch (``accelerate launch`` / ``torchrun``: every process joins the default
    process group, whose collectives give up after ``collective_timeout_s``; otherwise a group of one) and its
    device. An ``Accelerator`` built afterwards takes this state."""
    # cpu=True without CUDA: otherwise the ranks of a CPU launch are not synchronized (design.md §10).
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=collective_timeout_s))


def launched_processes(collective_timeout_s: int) -> tuple["Processes", torch.device]:
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) every process joins (see
    :func:`join_processes`); otherwise this one process works alone. The processes and this one's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with peer_failures_in_one_line():
            device = join_processes(collective_timeout_s).device
        return Processes.current(), device
    return Processes(), torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- a dead or hung peer ------------------------------------------------------------------------------------

class PeerFailure(UserError):
    """A collective failed: another process died or stopped answering (past its collective timeout)."""


def _is_collective_failure(exc: RuntimeError) -> bool:
    return isinstance(exc, dist.DistError) or (dist.is_initialized() and any(name in str(exc) for name in _TRANSPORTS))


@contextmanager
def peer_failures_in_one_line() -> Iterator[None]:
    """A collective that fails in the block because a peer died or hung becomes a one-line ``PeerFailure``,
    not a C++ trace; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if not _is_collective_failure(exc):
            raise
        raise PeerFailure(f"a collective failed: another process died or stopped answering ({first_line(exc)})"
                          ) from None


# -- tensors ------------------------------------------------------------------------------------------------

def gather_rows(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 in rank order (no gradient flows back); a collective.

    Every process must pass the same shape: the losses assume the same per-process batch everywhere.
    """
    if world_size == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def gather_batch(image: Tensor, text: Tensor, image_index: Tensor, text_index: Tensor, world_size: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All processes' image and text features and their global indices, without gradient, in ONE all-gather.

    The int64 indices travel bit for bit inside the (float32 or float64) feature rows, reinterpreted as that
    dtype: an all-gather copies bytes and never does arithmetic on them, so they arrive exact.
    """
    if world_size == 1:
        return image.detach(), text.detach(), image_index, text_index
    ids = torch.stack([image_index, text_index], 1).to(image.device, torch.int64).contiguous()
    both = gather_rows(torch.cat([image.detach(), text.detach(), ids.view(image.dtype)], dim=1), world_size)
    dim = image.shape[1]
    ids_all = both[:, 2 * dim:].contiguous().view(torch.int64)
    return both[:, :dim], both[:, dim:2 * dim], ids_all[:, 0], ids_all[:, 1]


def sum_rows(tensor: Tensor, world_size: int) -> Tensor:
    """``tensor`` summed over all processes, in place, in one all-reduce; a collective."""
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


# -- agreements ---------------------------------------------------------------------------------------------

def sum_over_processes(device: torch.device, *values: float) -> list[float]:
    """Each value summed over all processes, in one all-reduce (a collective), so that every process takes the
    same decision and none goes on alone into a collective."""
    return sum_rows(torch.tensor([float(v) for v in values], device=device), process_group()[1]).tolist()


def from_main(value: T) -> T:
    """The main process's picklable ``value``, on every process; a collective."""
    box = [value]
    if process_group()[1] > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


# -- evaluation's slices ------------------------------------------------------------------------------------

class EvaluationStopped(KeyboardInterrupt):
    """A stop was requested (a scheduler's SIGTERM, Ctrl-C) while a set was being encoded."""


@dataclass(frozen=True)
class Processes:
    """The processes that share an evaluation: this one's rank among ``world``. Each encodes a contiguous
    slice of a set and the slices are gathered in rank order, so that every process ends with exactly the
    rows one process would have computed. Errors and stop requests are agreed at the end of each slice
    (``run_agreed``), before the next collective, so that no process goes on alone into a gather that the
    others never reach."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Processes":
        """All processes of the default torch.distributed group (one when it is not initialized)."""
        return cls(*process_group())

    def part(self, length: int, block: int = 1) -> slice:
        """This process's contiguous share of ``length`` items, in whole blocks of ``block`` items (the last
        block may be short). Cut at batch boundaries, the slices hold exactly the batches one process would
        encode, so the embeddings are bit for bit one process's."""
        blocks = -(-length // block)
        start, stop = (blocks * r // self.world * block for r in (self.rank, self.rank + 1))
        return slice(min(start, length), min(stop, length))

    def gather(self, rows: Tensor) -> tuple[Tensor, list[int]]:
        """Every process's ``rows`` (any number each, the same trailing shape; a process without rows may pass
        an empty tensor of any shape) concatenated in rank order, and the number each contributed."""
        if self.world == 1:
            return rows, [rows.shape[0]]
        shapes = self.gather_objects(tuple(rows.shape) if rows.numel() else None)
        counts = [0 if shape is None else shape[0] for shape in shapes]
        trailing = next((shape[1:] for shape in shapes if shape is not None), rows.shape[1:])
        rows = rows.reshape(rows.shape[0] if rows.numel() else 0, *trailing)
        padded = rows.new_zeros((max(max(counts), 1), *trailing))
        padded[: rows.shape[0]] = rows
        with peer_failures_in_one_line():
            parts = gather_rows(padded, self.world).reshape(self.world, *padded.shape)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]), counts

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's picklable ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        with peer_failures_in_one_line():
            dist.all_gather_object(out, value)
        return out

    def run_agreed(self, work: Callable[[], T]) -> T:
        """``work()`` on this process; then every process learns whether any failed (a ``UserError``) or
        was stopped, and all raise together: the failing process its own error, the others a ``UserError``
        with its message; ``EvaluationStopped`` everywhere when a process was stopped."""
        failure: Optional[BaseException] = None
        result = None
        try:
            result = work()
        except (UserError, EvaluationStopped) as exc:
            failure = exc
        reports = self.gather_objects(None if failure is None else
                                      ("stopped" if isinstance(failure, EvaluationStopped) else "error", str(failure)))
        if failure is not None:
            raise failure
        for report in reports:
            if report is not None:
                kind, message = report
                raise EvaluationStopped() if kind == "stopped" else UserError(message)
        return result  # type: ignore[return-value]
