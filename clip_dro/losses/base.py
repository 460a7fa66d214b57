"""What every loss shares: hyperparameters, step/epoch counters, input checks and the global batch."""
from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from clip_dro.config import STATE_DEVICES, LossConfig, check_loss_hyperparameters
from clip_dro.distributed import gather_batch, process_group
from clip_dro.errors import UserError
from clip_dro.losses.schedules import check_rho, gamma_at
from clip_dro.losses.state import LossStateSizeError, SideState, StateShard, check_indices, reshard

STATE_LAYOUTS = ("sharded", "replicated")
MAX_LOGIT_SCALE = 100.0


@dataclass
class GlobalBatch:
    """One step's features: this process's (autograd-connected) and everyone's (no gradient), in rank order,
    and everyone's indices."""

    image: Tensor
    text: Tensor
    image_all: Tensor
    text_all: Tensor
    image_index: Tensor  # the global indices of every pair of the global batch, in rank order
    text_index: Tensor
    world_size: int
    offset: int

    @property
    def local_size(self) -> int:
        return self.image.shape[0]

    @property
    def size(self) -> int:
        return self.image_all.shape[0]


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise UserError(f"loss.{key}: {value!r} {why}")


class ContrastiveLoss(nn.Module, ABC):
    """Base of every loss: CLIPLoss, SogCLRLoss, ISogCLRLoss, RGCLgLoss (through GatheredBatchLoss) and
    SigLIPLoss (see their docstrings).

    Counters ``step`` (forward calls so far: the temperature warm-up counts these) and ``epoch`` (the last
    ``set_epoch``) and the dataset ``sizes`` are buffers, so ``state_dict()`` resumes them exactly; loading a
    state of other sizes raises ``LossStateSizeError``.

    Per-sample state under torch.distributed (W processes, fixed when the loss is built):
    ``state_layout="sharded"`` (default) keeps on each process only the ids it owns (id % W == rank: N/W of
    them) and fetches and writes back the global batch's rows each step with one all-reduce of B x (2 or 4)
    float32 per side; ``"replicated"`` keeps every id on every process. Both compute the same numbers.
    ``state_dict()`` then holds this process's shard (``shard_layout`` = [rank, W]); ``load_state_shards``
    loads the shards of all processes of a run at any W. ``state_device="cpu"`` keeps the per-sample buffers
    in host memory when the loss is moved to an accelerator.
    """

    learns_tau_by_rho = False  # whether ρ drives a temperature (then ρ is checked against the batch)

    def __init__(self, num_images: int, num_texts: int, *, gamma: float = LossConfig.gamma,
                 rho: float = LossConfig.rho, tau_init: float = LossConfig.tau_init,
                 tau_min: float = LossConfig.tau_min, tau_max: float = LossConfig.tau_max,
                 tau_lr: float = LossConfig.tau_lr, tau_momentum: float = LossConfig.tau_momentum,
                 tau_grad_clip: float = LossConfig.tau_grad_clip, gamma_schedule: str = LossConfig.gamma_schedule,
                 gamma_decay_epochs: float = LossConfig.gamma_decay_epochs,
                 tau_warmup_steps: int = LossConfig.tau_warmup_steps, state_layout: str = STATE_LAYOUTS[0],
                 state_device: str = LossConfig.state_device) -> None:
        super().__init__()
        _require(int(num_images) >= 1, "num_images", num_images, "must be >= 1")
        _require(int(num_texts) >= 1, "num_texts", num_texts, "must be >= 1")
        _require(state_layout in STATE_LAYOUTS, "state_layout", state_layout,
                 f"must be one of {', '.join(STATE_LAYOUTS)}")
        _require(state_device in STATE_DEVICES, "state_device", state_device,
                 f"must be one of {', '.join(STATE_DEVICES)}")
        rank, world_size = process_group()
        # The processes that share the per-sample state are fixed here: the state is built for them.
        self.world_size = world_size
        self.shard = StateShard(rank, world_size) if state_layout == "sharded" else StateShard()
        self.state_on_cpu = state_device == "cpu"
        _require(min(int(num_images), int(num_texts)) >= self.shard.world, "num_images", (num_images, num_texts),
                 f"and num_texts must be at least the number of processes sharing the state ({self.shard.world})")
        check_loss_hyperparameters(gamma=gamma, rho=rho, tau_init=tau_init, tau_min=tau_min, tau_max=tau_max,
                                   tau_lr=tau_lr, tau_momentum=tau_momentum, tau_grad_clip=tau_grad_clip,
                                   gamma_schedule=gamma_schedule, gamma_decay_epochs=gamma_decay_epochs,
                                   tau_warmup_steps=tau_warmup_steps)
        self.num_images, self.num_texts = int(num_images), int(num_texts)
        self.gamma, self.rho = float(gamma), float(rho)
        self.tau_init, self.tau_min, self.tau_max = float(tau_init), float(tau_min), float(tau_max)
        self.tau_lr, self.tau_momentum, self.tau_grad_clip = float(tau_lr), float(tau_momentum), float(tau_grad_clip)
        self.gamma_schedule, self.gamma_decay_epochs = gamma_schedule, float(gamma_decay_epochs)
        self.tau_warmup_steps = int(tau_warmup_steps)
        self.register_buffer("sizes", torch.tensor([self.num_images, self.num_texts]))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.float64))
        # Which shard of which layout the per-sample buffers are (checked on load; see load_state_shards).
        self.register_buffer("shard_layout", torch.tensor([self.shard.rank, self.shard.world]))
        # Python mirrors of the counters, so that forward never waits on the device to read them.
        self._step, self._epoch = 0, 0.0
        self._rho_checked = False
        self._last: dict[str, Tensor] = {}

    # -- schedule and counters ---------------------------------------------------------------------------
    def set_epoch(self, epoch: float) -> None:
        """Set the (fractional) training epoch that the γ schedule follows."""
        self._epoch = float(epoch)
        self.epoch.fill_(self._epoch)

    @property
    def current_gamma(self) -> float:
        return gamma_at(self._epoch, self.gamma, self.gamma_schedule, self.gamma_decay_epochs)

    @property
    def steps_done(self) -> int:
        return self._step

    def tau_held(self) -> bool:
        """Whether this step is inside the temperature warm-up (the first ``tau_warmup_steps`` forward calls)."""
        return self._step < self.tau_warmup_steps

    def _count_step(self) -> None:
        self._step += 1
        self.step.fill_(self._step)

    def after_optimizer_step(self) -> None:
        """Hook for the training loop after each optimizer step (CLIP clamps its logit scale)."""

    # -- reporting -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Values of the last step for logging (one device synchronisation); see the subclass docstrings."""
        out = {name: float(value) for name, value in self._last.items()}
        out["gamma"] = self.current_gamma
        return out

    def bytes_per_sample(self) -> dict[str, int]:
        """Bytes of per-sample state per image and per caption (design.md §5.2: at most 24)."""
        return {"image": 0, "text": 0}

    def owned_temperatures(self) -> Optional[dict[str, tuple[Tensor, Tensor]]]:
        """Per side, (global ids, τ) of the samples whose state this process owns (no communication); None
        for a loss without per-sample temperatures."""
        return None

    @property
    @abstractmethod
    def tau_img(self) -> Tensor:
        """Temperature of every image (length num_images)."""

    @property
    @abstractmethod
    def tau_txt(self) -> Tensor:
        """Temperature of every caption (length num_texts)."""

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _sides(self) -> dict[str, SideState]:
        """The per-sample state of each side, by state-dict prefix (``img.``, ``txt.``)."""
        return {f"{name}.": module for name, module in self.named_children() if isinstance(module, SideState)}

    def _check_sizes(self, sizes: Optional[Tensor]) -> None:
        if sizes is not None and [int(v) for v in sizes] != [self.num_images, self.num_texts]:
            raise LossStateSizeError(
                f"loss state is for num_images={int(sizes[0])}, num_texts={int(sizes[1])} but this loss was built "
                f"for num_images={self.num_images}, num_texts={self.num_texts} (a checkpoint of another dataset?)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        self._check_sizes(state_dict.get(prefix + "sizes"))
        layout = state_dict.get(prefix + "shard_layout")
        if layout is not None and [int(v) for v in layout] != list(self.shard):
            raise LossStateSizeError(
                f"loss state is shard {int(layout[0])} of {int(layout[1])} processes but this loss holds shard "
                f"{self.shard.rank} of {self.shard.world}: load every process's state with load_state_shards")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._step, self._epoch = int(self.step), float(self.epoch)

    def load_state_shards(self, shards: Sequence[Mapping[str, Tensor]]) -> None:
        """Load the state that the processes of a run saved (``shards[k]``: process k's ``state_dict()``), at
        any number of processes then and now: the per-sample state is re-sharded id by id."""
        shards = [dict(shard) for shard in shards]
        for number, shard in enumerate(shards):
            layout = shard.get("shard_layout", torch.tensor([0, 1]))  # states saved before sharding: one shard
            if [int(v) for v in layout] != [number, len(shards)]:
                raise LossStateSizeError(f"loss state shard {number} of {len(shards)} says it is shard "
                                         f"{int(layout[0])} of {int(layout[1])}: the shards are not one set")
            self._check_sizes(shard.get("sizes"))
        mine = reshard(shards, {prefix: side.size for prefix, side in self._sides().items()}, self.shard)
        mine["shard_layout"] = torch.tensor(list(self.shard))
        self.load_state_dict(mine)

    # -- the step ------------------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, image_features: Tensor, text_features: Tensor, image_index: Tensor,
                text_index: Tensor) -> Tensor:
        """The loss of this step, after updating the per-sample state (see the class docstring)."""

    def _check_inputs(self, image: Tensor, text: Tensor, image_index: Tensor, text_index: Tensor) -> tuple[int, int]:
        """Check one process's features and indices against this loss; returns (rank, world size)."""
        if image.dim() != 2 or text.shape != image.shape:
            raise ValueError(f"image and text features must both be (batch, dim); got {tuple(image.shape)} and "
                             f"{tuple(text.shape)}")
        local = image.shape[0]
        check_indices(image_index, self.num_images, "image_index", local)
        check_indices(text_index, self.num_texts, "text_index", local)
        device = self.sizes.device
        if image.device != device or text.device != device:
            raise ValueError(f"features are on {image.device} but the loss state is on {device}: move the loss "
                             f"with loss.to(device)")
        rank, world_size = process_group()
        if world_size != self.world_size:
            raise ValueError(f"this loss was built with {self.world_size} processes (its per-sample state is "
                             f"laid out for them); torch.distributed now has {world_size}")
        if local * world_size < 2:
            raise ValueError(f"global batch of {local * world_size}: contrastive losses need at least 2 pairs")
        return rank, world_size


class GatheredBatchLoss(ContrastiveLoss):
    """A loss computed from the global batch that every process gathers (features without gradient, indices)
    and differentiated in closed form: subclasses implement ``_step_loss``."""

    def forward(self, image_features: Tensor, text_features: Tensor, image_index: Tensor,
                text_index: Tensor) -> Tensor:
        batch = self._global_batch(image_features, text_features, image_index, text_index)
        with torch.autocast(device_type=batch.image.device.type, enabled=False):
            loss = self._step_loss(batch)
        self._count_step()
        return loss

    @abstractmethod
    def _step_loss(self, batch: GlobalBatch) -> Tensor:
        """Update the per-sample state from ``batch`` and return the loss to backpropagate."""

    def _global_batch(self, image: Tensor, text: Tensor, image_index: Tensor, text_index: Tensor) -> GlobalBatch:
        rank, world_size = self._check_inputs(image, text, image_index, text_index)
        local = image.shape[0]
        self._check_rho_once(local * world_size)
        dtype = torch.float64 if torch.float64 in (image.dtype, text.dtype) else torch.float32
        image, text = image.to(dtype), text.to(dtype)
        device = self.sizes.device
        image_index, text_index = image_index.to(device, torch.int64), text_index.to(device, torch.int64)
        image_all, text_all, image_index_all, text_index_all = gather_batch(image, text, image_index, text_index,
                                                                           world_size)
        return GlobalBatch(image, text, image_all, text_all, image_index_all, text_index_all, world_size, rank * local)

    def _check_rho_once(self, global_batch: int) -> None:
        if self.learns_tau_by_rho and not self._rho_checked:
            self._rho_checked = True
            message = check_rho(self.rho, global_batch)
            if message is not None:
                warnings.warn(message, UserWarning, stacklevel=6)  # at the caller of loss(...)


class LearnedLogitScale:
    """For a loss with one learnable temperature, ``logit_scale`` = log(1/τ) (an ``nn.Parameter`` the loss
    creates): τ seen per sample, and the clamp to [0, log 100] after each optimizer step, as open_clip's
    training loop clamps."""

    logit_scale: nn.Parameter
    num_images: int
    num_texts: int

    @property
    def tau_img(self) -> Tensor:
        return expanded(torch.exp(-self.logit_scale.detach()), self.num_images)

    @property
    def tau_txt(self) -> Tensor:
        return expanded(torch.exp(-self.logit_scale.detach()), self.num_texts)

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def expanded(value: Tensor, length: int) -> Tensor:
    """A 1-element temperature seen as a per-sample tensor (a view: no memory per sample)."""
    return value.reshape(1).expand(length)

