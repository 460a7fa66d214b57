"""iSogCLR and its relatives SogCLR (one fixed τ) and RGCL-g (one learned global τ): design.md §4.1, §4.2."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from clip_dro.distributed import gather_rows
from clip_dro.losses.base import GatheredBatchLoss, GlobalBatch
from clip_dro.losses.gradient import with_closed_form_gradient
from clip_dro.losses.state import SideState, fetch_batch_state
from clip_dro.losses.updates import (FixedTau, GlobalTau, IndividualTau, TauPolicy, TauStep, duplicate_groups,
                                     next_log_s)


class AnchorSums(NamedTuple):
    """Per-anchor sums over the negatives of one side, from this process's block of similarities."""

    weights: Tensor  # exp(h/τ − peak), 0 at the positive; becomes w in place
    peak: Tensor  # max over negatives of h/τ
    log_g: Tensor  # log g = log (1/(B−1)) Σ_j exp(h_j/τ)
    mean_h: Tensor  # Σ_j q_j·h_j with q the softmax of h/τ over the negatives


def anchor_sums(sim: Tensor, positive: Tensor, tau: Tensor, offset: int) -> AnchorSums:
    """Rows of ``sim`` are anchors at global positions offset, offset+1, ...; columns the whole global batch.

    ``positive`` holds the anchors' S_kk; column offset+k of row k is the positive pair and is excluded. Every
    exponent is shifted by its row maximum, so nothing overflows at any τ.
    """
    inv_tau = 1.0 / tau
    z = torch.addcmul((-positive * inv_tau)[:, None], sim, inv_tau[:, None])  # h/τ in one pass
    z.diagonal(offset).fill_(-math.inf)
    peak = z.amax(1)
    weights = z.sub_(peak[:, None]).exp_()
    total = weights.sum(1)
    mean_h = torch.linalg.vecdot(weights, sim) / total - positive  # Σ_j q_j (S_j − S_kk)
    log_g = peak + torch.log(total) - math.log(sim.shape[1] - 1)
    return AnchorSums(weights, peak, log_g, mean_h)


def negative_weights(sim: Tensor, positive: Tensor, tau: Tensor, log_s: Tensor, offset: int) -> Tensor:
    """w of every anchor (columns: the global batch) at this process's negatives (rows of ``sim``).

    Entry [k, j] is exp((S − S_jj)/τ_j − log s_j) for anchor j and local negative k; 0 where k is j's positive.
    Bounded by (B − 1)/γ because log s_j ≥ log γ + max h/τ − log(B − 1).
    """
    z = (sim - positive[None, :]).div_(tau[None, :]).sub_(log_s[None, :]).exp_()
    z.diagonal(offset).zero_()
    return z


def _exchange(img: AnchorSums, txt: AnchorSums, batch: GlobalBatch) -> tuple[Tensor, ...]:
    """Every anchor's (log g, mean h) of both sides, in rank order (float64), in one fused all-gather."""
    sums = torch.stack([img.log_g, img.mean_h, txt.log_g, txt.mean_h], 1).double()
    return gather_rows(sums, batch.world_size).unbind(1)


def _coefficients(img: AnchorSums, txt: AnchorSums, sim_rows: Tensor, sim_cols: Tensor, positive: Tensor,
                  log_g_i: Tensor, log_g_t: Tensor, log_s_i: Tensor, log_s_t: Tensor, tau_i: Tensor,
                  tau_t: Tensor, batch: GlobalBatch) -> tuple[Tensor, Tensor]:
    """dL/dS at this process's rows and columns (in place over the anchors' weights), times the world size W.

    dL/dS_kj = (w^I_kj + w^T_jk − [k = j]·Σ_l (w^I_kl + w^T_kl)) / (B(B − 1)), where w^I are the image
    anchors' weights and w^T the text anchors'; w = exp(h/τ − log s) rescales the row-shifted exponentials of
    ``anchor_sums``. The weights of the other processes' anchors at this process's negatives are recomputed
    from their exchanged log s. All arguments but the AnchorSums are global (length B) and in the compute dtype.
    """
    size, offset, world = batch.size, batch.offset, batch.world_size
    local = slice(offset, offset + batch.local_size)
    scale = world / (size * (size - 1))
    row_sums = (size - 1) * (torch.exp(log_g_i - log_s_i) + torch.exp(log_g_t - log_s_t))  # Σ_l w^I_kl + w^T_kl
    img_scale = torch.exp(img.peak - log_s_i[local]) * scale
    txt_scale = torch.exp(txt.peak - log_s_t[local]) * scale
    if world == 1:
        rows = img.weights.mul_(img_scale[:, None]).addcmul_(txt.weights.T, txt_scale[None, :])
        rows.diagonal().sub_(row_sums * scale)
        return rows, rows
    rows = img.weights.mul_(img_scale[:, None])
    rows.add_(negative_weights(sim_rows, positive, tau_t, log_s_t, offset), alpha=scale)
    rows.diagonal(offset).sub_(row_sums[local] * scale)
    columns_t = txt.weights.mul_(txt_scale[:, None])
    columns_t.add_(negative_weights(sim_cols.T, positive, tau_i, log_s_i, offset), alpha=scale)
    columns_t.diagonal(offset).sub_(row_sums[local] * scale)
    return rows, columns_t.T


class RobustLoss(GatheredBatchLoss):
    """The two-sided robust contrastive loss (design.md §4.1); each subclass chooses how τ is kept
    (``temperatures``)."""

    temperatures: TauPolicy

    def __init__(self, num_images: int, num_texts: int, **kwargs) -> None:
        super().__init__(num_images, num_texts, **kwargs)
        per_sample = self.temperatures.per_sample
        self.img = SideState(self.num_images, self.tau_init, per_sample, self.shard, self.state_on_cpu)
        self.txt = SideState(self.num_texts, self.tau_init, per_sample, self.shard, self.state_on_cpu)
        self.temperatures.attach(self)

    @property
    def learns_tau_by_rho(self) -> bool:  # type: ignore[override]
        return self.temperatures.learned

    # -- temperatures --------------------------------------------------------------------------------------
    @property
    def tau_img(self) -> Tensor:
        """τ of every image (length num_images). With sharded per-sample τ under torch.distributed this gathers
        the shards: a collective that every process must call, holding all N values on each."""
        return self.temperatures.every(self, self.img, self.num_images)

    @property
    def tau_txt(self) -> Tensor:
        """τ of every caption (length num_texts); gathered like ``tau_img``."""
        return self.temperatures.every(self, self.txt, self.num_texts)

    def owned_temperatures(self) -> Optional[dict[str, tuple[Tensor, Tensor]]]:
        return self.temperatures.owned(self)

    def bytes_per_sample(self) -> dict[str, int]:
        return {"image": self.img.bytes_per_sample(), "text": self.txt.bytes_per_sample()}

    # -- the step ------------------------------------------------------------------------------------------
    def _step_loss(self, batch: GlobalBatch) -> Tensor:
        dtype, offset, world, device = batch.image.dtype, batch.offset, batch.world_size, batch.image.device
        local = slice(offset, offset + batch.local_size)
        with torch.no_grad():
            ids_i, ids_t = batch.image_index, batch.text_index
            old_i, old_t = fetch_batch_state([(self.img, ids_i), (self.txt, ids_t)], device)
            tau_i = self.temperatures.used(self, old_i, batch.size, device).double()  # as read before this step
            tau_t = self.temperatures.used(self, old_t, batch.size, device).double()
            image, text = batch.image.detach(), batch.text.detach()
            sim_rows = image @ batch.text_all.T  # this process's images against every text
            sim_cols = sim_rows if world == 1 else batch.image_all @ text.T  # every image against its texts
            positive = torch.linalg.vecdot(batch.image_all, batch.text_all)
            img = anchor_sums(sim_rows, positive[local], tau_i[local].to(dtype), offset)
            txt = anchor_sums(sim_cols.T, positive[local], tau_t[local].to(dtype), offset)
            log_g_i, mean_h_i, log_g_t, mean_h_t = _exchange(img, txt, batch)
            group_i, group_t = duplicate_groups(ids_i), duplicate_groups(ids_t)
            log_s_i = next_log_s(old_i, log_g_i, group_i, self.current_gamma)
            log_s_t = next_log_s(old_t, log_g_t, group_t, self.current_gamma)
            loss_i = torch.exp(log_g_i - log_s_i) * mean_h_i  # (1/(B−1)) Σ_j w_kj h_kj
            loss_t = torch.exp(log_g_t - log_s_t) * mean_h_t
            grad_tau_i = log_s_i + self.rho - loss_i / tau_i  # G_k
            grad_tau_t = log_s_t + self.rho - loss_t / tau_t
            new_i, new_t = self.temperatures.update(self, TauStep(old_i, grad_tau_i, group_i, tau_i),
                                                    TauStep(old_t, grad_tau_t, group_t, tau_t))
            self.img.store(ids_i, log_s_i, *new_i)
            self.txt.store(ids_t, log_s_t, *new_t)
            value = (loss_i + loss_t).mean().to(dtype)
            rho = self.rho if self.learns_tau_by_rho else 0.0
            self._last = {
                "loss": value,
                "objective": (tau_i * (log_s_i + rho) + tau_t * (log_s_t + rho)).mean(),
                "tau_img_mean": self.temperatures.batch_mean(self, new_i),
                "tau_txt_mean": self.temperatures.batch_mean(self, new_t),
            }
        rows = columns = None
        if torch.is_grad_enabled() and (batch.image.requires_grad or batch.text.requires_grad):
            with torch.no_grad():
                per_sample = [v.to(dtype) for v in (log_g_i, log_g_t, log_s_i, log_s_t, tau_i, tau_t)]
                rows, columns = _coefficients(img, txt, sim_rows, sim_cols, positive, *per_sample, batch)
        return with_closed_form_gradient(value, batch.image, batch.text, rows, columns, batch.image_all,
                                         batch.text_all)


class ISogCLRLoss(RobustLoss):
    """iSogCLR: the two-sided robust contrastive loss with individualized temperatures (design.md §4.1).

    ``loss(image_features, text_features, image_index, text_index)`` takes this process's L2-normalized
    features (any float dtype; computed in float32, or float64 for float64 input, with autocast disabled) and
    int64 global indices, updates s, m and τ of the batch's samples, and returns L = L_img + L_txt, the
    surrogate whose gradient (through h only) is that of the robust objective; it goes negative. An index
    outside [0, num_images) / [0, num_texts) raises ``LossIndexError`` (a ``UserError`` and ``IndexError``)
    naming it, before any state changes; checking it costs one device sync when the indices live on an
    accelerator, none when they are passed on the CPU. The first call warns once when ρ ≥ log(B − 1) for the
    global batch B (``check_rho``).

    State (buffers, all in ``state_dict()``): ``img.log_s``/``txt.log_s`` (s kept as log s, so that h/τ up to
    400 never overflows), ``img.visited``, ``img.tau``, ``img.m`` (and the text ones), the counters ``step``
    and ``epoch``, ``sizes`` and ``shard_layout``: 13 bytes per image and per caption (``bytes_per_sample()``),
    for the ids this process owns.

    Duplicate ids in one global batch: each position computes its batch estimate from the state as it was
    before the step; the id is then updated once, with the mean of its positions' g and of their clipped G,
    and all its positions use that updated s (see ``clip_dro.losses.updates``). Order-independent.

    Temperature warm-up: during the first ``tau_warmup_steps`` calls of forward every τ stays at τ_init
    while s and m update. ``set_epoch(e)`` drives the γ schedule (``gamma_schedule``).

    Distributed (torch.distributed initialized, W > 1 processes, equal per-process batch b): features are
    gathered WITHOUT gradient; each process computes the gradient of the global loss (batch B = W·b in rank
    order) with respect to its own features, as anchors and as negatives, from one fused all-gather of
    per-anchor scalars. That gradient is multiplied by W, because DDP averages gradients over the W
    processes: after DDP's all-reduce-mean the update is exactly the single-process batch-B update. The
    returned value is the global loss, the same on every process. The per-sample state is sharded by id over
    the processes (see ``ContrastiveLoss``): each step fetches the batch's rows from their owners in one
    all-reduce, and every owner writes back exactly what one process holding the whole state would.

    ``stats()`` (after a step): ``loss``; ``objective`` = mean over the global batch of
    τ^I(log s^I + ρ) + τ^T(log s^T + ρ) with the τ used in the step and the updated s; ``tau_img_mean`` /
    ``tau_txt_mean`` = mean τ of the batch's samples after the update; ``gamma`` = the current γ.
    """

    temperatures = IndividualTau()


class SogCLRLoss(RobustLoss):
    """SogCLR (design.md §4.2): ``ISogCLRLoss`` with one fixed temperature τ = ``tau_init`` and no τ update.

    ``tau_img``/``tau_txt`` are constant views of τ_init (no memory); the state is s only (5 bytes per sample).
    The logged ``objective`` is mean τ(log s^I + log s^T), without ρ, which SogCLR does not use.
    """

    temperatures = FixedTau()


class RGCLgLoss(RobustLoss):
    """RGCL-g (FastCLIP's robust global contrastive loss): ``ISogCLRLoss`` with ONE temperature for all samples.

    The global τ follows the derivative of the design.md §4.1 objective with every τ tied together (``GlobalTau``).
    State: ``tau`` and ``tau_m`` (one element each) plus s per sample (5 bytes); ``tau_img``/``tau_txt`` are
    views of the global τ expanded to every sample.
    """

    temperatures = GlobalTau()
