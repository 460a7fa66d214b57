"""Evaluation on every process (SPEC 5): each process encodes a contiguous slice of a set, and the slices are
gathered in rank order, so every process ends with exactly the rows one process would have computed.

Errors and stop requests are agreed at the end of each slice, before the next collective, so that no process
goes on alone into a gather that the others never reach.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from clip_dro.errors import UserError
from clip_dro.losses.distributed import process_group

T = TypeVar("T")


class EvaluationStopped(KeyboardInterrupt):
    """A stop was requested (a scheduler's SIGTERM, Ctrl-C) while a set was being encoded."""


@dataclass(frozen=True)
class Processes:
    """The processes that share an evaluation: this one's rank among ``world``."""

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

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
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
        parts = self._all_gather_tensor(padded).reshape(self.world, *padded.shape)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]), counts

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's picklable ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def _all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

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
