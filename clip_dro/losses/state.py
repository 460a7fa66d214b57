"""Per-sample state indexed by global image/text indices: its storage, sharded over the processes, and the
reads and writes of a batch's rows. The rules that update it are the loss's (``clip_dro.losses.updates``).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from clip_dro.distributed import gather_rows, sum_rows
from clip_dro.errors import UserError

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class LossIndexError(UserError, IndexError):
    """A global image/text index outside the loss state (the data and the loss disagree on the dataset)."""


class LossStateSizeError(UserError):
    """A loss state built for a dataset of another size (for example a checkpoint of another dataset)."""


def check_indices(index: Tensor, size: int, name: str, batch: int) -> None:
    """Raise a clear error unless ``index`` is a 1-D integer tensor of ``batch`` entries in [0, size).

    Costs one device synchronisation when ``index`` lives on an accelerator; pass CPU indices to avoid it.
    """
    if not isinstance(index, Tensor) or index.dtype not in _INTEGER_DTYPES:
        raise LossIndexError(f"{name} must be an integer tensor of global indices, got "
                             f"{getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 1 or index.numel() != batch:
        raise LossIndexError(f"{name} has shape {tuple(index.shape)}, expected ({batch},) to match the features")
    if batch == 0:
        return
    low, high = (int(v) for v in torch.aminmax(index.detach().long()))
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise LossIndexError(f"{name} {bad} is outside the loss state [0, {size}): the loss was built for "
                             f"{size} {'images' if name.startswith('image') else 'texts'}")


class StateShard(NamedTuple):
    """Which ids a process owns: those with ``id % world == rank``, kept at position ``id // world``.

    Striding (rather than blocks) spreads any batch evenly over the owners and needs no table.
    """

    rank: int = 0
    world: int = 1

    def size(self, total: int) -> int:
        """Number of the ids in [0, total) this process owns."""
        return max(0, (total - self.rank + self.world - 1) // self.world)

    def ids(self, total: int) -> Tensor:
        """The global ids this process owns, in storage order."""
        return torch.arange(self.rank, total, self.world)


class BatchState(NamedTuple):
    """One side's state at the positions of a global batch, as read before the step (float32)."""

    log_s: Tensor
    visited: Tensor  # bool
    tau: Optional[Tensor]
    m: Optional[Tensor]


class SideState(nn.Module):
    """The state of one side (images or texts): s in log form, a visited flag, and optionally τ and m, for
    the ids this process owns (all of them with one process or the replicated layout).

    s is kept as log s (float32): exp(h/τ) reaches e^400 at τ_min = 0.005, but its logarithm is small, and
    log s never overflows or underflows however far the scale of g moves between visits.
    Memory: 4 (log s) + 1 (visited) bytes per owned sample, + 4 (τ) + 4 (m) with individual temperatures.
    With ``on_cpu`` the buffers stay in host memory whatever device the module is moved to: the step copies
    the batch's rows to the compute device and back.
    """

    def __init__(self, size: int, tau_init: float, individual_tau: bool, shard: StateShard = StateShard(),
                 on_cpu: bool = False) -> None:
        super().__init__()
        self.size, self.shard, self.on_cpu = size, shard, on_cpu
        owned = shard.size(size)
        self.register_buffer("log_s", torch.zeros(owned))
        self.register_buffer("visited", torch.zeros(owned, dtype=torch.bool))
        if individual_tau:
            self.register_buffer("tau", torch.full((owned,), float(tau_init)))
            self.register_buffer("m", torch.zeros(owned))

    def _apply(self, fn, recurse=True):  # noqa: ANN001  (nn.Module's signature)
        return self if self.on_cpu else super()._apply(fn, recurse)

    @property
    def individual_tau(self) -> bool:
        return hasattr(self, "tau")

    def bytes_per_sample(self) -> int:
        return sum(buffer.element_size() for buffer in self.buffers())

    def _owned(self, ids: Tensor) -> Optional[Tensor]:
        """Which of ``ids`` this process owns; None when it owns them all (then nothing is masked, and no
        boolean indexing makes the device wait)."""
        return None if self.shard.world == 1 else ids % self.shard.world == self.shard.rank

    def owned_rows(self, ids: Tensor, device: torch.device) -> Tensor:
        """[len(ids), columns] float32 on ``device``: this process's state at the ids it owns, 0 elsewhere."""
        ids = ids.to(self.log_s.device)
        owned = self._owned(ids)
        local = ids if owned is None else torch.where(owned, ids // self.shard.world, 0)
        columns = [self.log_s[local], self.visited[local].float()]
        if self.individual_tau:
            columns += [self.tau[local], self.m[local]]
        rows = torch.stack(columns, 1)
        if owned is not None:
            rows = torch.where(owned[:, None], rows, 0.0)
        return rows.to(device)

    def batch_state(self, rows: Tensor) -> BatchState:
        columns = rows.unbind(1)
        tau, m = (columns[2], columns[3]) if self.individual_tau else (None, None)
        return BatchState(columns[0], columns[1] > 0.5, tau, m)

    def store(self, ids: Tensor, log_s: Tensor, tau: Optional[Tensor] = None, m: Optional[Tensor] = None) -> None:
        """Write the updated rows of the ids this process owns (every position of an id carries the same
        values, so the scattered writes are deterministic); marks them visited."""
        ids = ids.to(self.log_s.device)
        owned = self._owned(ids)
        if owned is not None:
            ids, keep = ids[owned] // self.shard.world, owned.to(log_s.device)
            log_s, tau, m = (None if v is None else v[keep] for v in (log_s, tau, m))
        self.log_s[ids] = log_s.to(self.log_s)
        self.visited[ids] = True
        if tau is not None:
            self.tau[ids] = tau.to(self.tau)
            self.m[ids] = m.to(self.m)

    def full(self, name: str) -> Tensor:
        """Buffer ``name`` for every id in [0, size): the buffer itself when this process owns all ids, else
        gathered from all processes (a collective: every process must call it)."""
        mine = getattr(self, name)
        if self.shard.world == 1:
            return mine
        padded = torch.zeros(StateShard(0, self.shard.world).size(self.size), dtype=mine.dtype, device=mine.device)
        padded[: mine.numel()] = mine
        parts = gather_rows(padded, self.shard.world).view(self.shard.world, -1)
        out = torch.empty(self.size, dtype=mine.dtype, device=mine.device)
        for rank, part in enumerate(parts):
            out[rank::self.shard.world] = part[: StateShard(rank, self.shard.world).size(self.size)]
        return out


def fetch_batch_state(sides: Sequence[tuple[SideState, Tensor]], device: torch.device) -> list[BatchState]:
    """Every side's state at its ids (the global batch's, the same on every process), on ``device``.

    With sharded state each process fills the rows it owns and one all-reduce (sum) over all sides completes
    them: B x (2 or 4) float32 per side, exact because each row has exactly one non-zero contribution.
    """
    rows = [side.owned_rows(ids, device) for side, ids in sides]
    world = max(side.shard.world for side, _ in sides)
    if world > 1:
        packed = sum_rows(torch.cat(rows, 1), world)
        rows = list(packed.split([r.shape[1] for r in rows], 1))
    return [side.batch_state(r) for (side, _), r in zip(sides, rows)]


def reshard(shards: Sequence[Mapping[str, Tensor]], side_sizes: Mapping[str, int], shard: StateShard
            ) -> dict[str, Tensor]:
    """This process's state dict from the state dicts of every process of a (possibly other) layout.

    ``shards[k]`` is what process k of len(shards) saved; ``side_sizes`` maps the prefix of each side's
    buffers (``img.``) to its number of ids. Per-sample buffers are reassembled id by id; every other entry
    is the same on every process and taken from the first shard.
    """
    old_world = len(shards)
    out = {key: value for key, value in shards[0].items()
           if not any(key.startswith(prefix) for prefix in side_sizes)}
    for prefix, size in side_sizes.items():
        mine = shard.ids(size)
        for key in (k for k in shards[0] if k.startswith(prefix)):
            if old_world == shard.world:
                out[key] = shards[shard.rank][key]
                continue
            merged = torch.empty(mine.numel(), dtype=shards[0][key].dtype)
            owner, position = mine % old_world, mine // old_world
            for k, state in enumerate(shards):
                take = owner == k
                merged[take] = state[key][position[take]]
            out[key] = merged
    return out
