"""CLIP's symmetric cross-entropy with a learnable global temperature (design.md §4.3)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from clip_dro.distributed import gather_rows
from clip_dro.losses.base import GatheredBatchLoss, GlobalBatch, LearnedLogitScale
from clip_dro.losses.gradient import with_closed_form_gradient


class SoftmaxSums(NamedTuple):
    """Per-anchor softmax over the whole global batch (positive included), from this process's block."""

    exps: Tensor  # exp(scale·S − peak) over each row (the softmax before normalization)
    total: Tensor  # row sums of ``exps``
    log_norm: Tensor  # logsumexp of scale·S
    mean_sim: Tensor  # Σ_j p_j·S_j


def softmax_sums(sim: Tensor, scale: Tensor) -> SoftmaxSums:
    exps = sim * scale
    peak = exps.amax(1)
    exps.sub_(peak[:, None]).exp_()
    total = exps.sum(1)
    return SoftmaxSums(exps, total, peak + torch.log(total), torch.linalg.vecdot(exps, sim) / total)


class CLIPLoss(LearnedLogitScale, GatheredBatchLoss):
    """Symmetric cross-entropy over the global batch, numerically open_clip's ``ClipLoss`` (local loss,
    gather with gradient) with ``logit_scale.exp()`` as the scale.

    ``logit_scale`` is this module's parameter (log space, initialized to log(1/``tau_init``)); put
    ``loss.parameters()`` in the optimizer and call ``after_optimizer_step()`` after each optimizer step: it
    clamps the logit scale to [0, log 100] as open_clip's training loop does. The other ``loss.*`` keywords
    are accepted and unused. ``tau_img``/``tau_txt``: 1/exp(logit_scale), expanded to every sample (a view).

    Distributed: as ``ISogCLRLoss`` — features gathered without gradient, the gradient of the global loss with
    respect to this process's features multiplied by W for DDP's averaging. The gradient of ``logit_scale`` is
    the full global one on every process (computed from exchanged per-anchor scalars), so it is right whether
    or not the loss module itself is wrapped in DDP. ``stats()``: ``loss`` = ``objective`` (the cross-entropy),
    ``tau_img_mean`` = ``tau_txt_mean`` = 1/scale, ``logit_scale`` (the scale), ``gamma`` (unused by CLIP).
    """

    def __init__(self, num_images: int, num_texts: int, **kwargs) -> None:
        super().__init__(num_images, num_texts, **kwargs)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.tau_init)))

    def _step_loss(self, batch: GlobalBatch) -> Tensor:
        dtype, world = batch.image.dtype, batch.world_size
        with torch.no_grad():
            scale = self.logit_scale.detach().to(dtype).exp()
            sim_rows = batch.image.detach() @ batch.text_all.T
            sim_cols = sim_rows if world == 1 else batch.image_all @ batch.text.detach().T
            positive = torch.linalg.vecdot(batch.image_all, batch.text_all)
            img = softmax_sums(sim_rows, scale)  # image anchors: rows
            txt = softmax_sums(sim_cols.T, scale)  # text anchors: columns
            sums = gather_rows(torch.stack([img.log_norm, img.mean_sim, txt.log_norm, txt.mean_sim], 1).double(),
                               world)
            log_norm_i, mean_sim_i, log_norm_t, mean_sim_t = sums.unbind(1)
            positive64, scale64 = positive.double(), scale.double()
            value = ((log_norm_i + log_norm_t).mean() / 2 - scale64 * positive64.mean()).to(dtype)
            # dL/dlog(scale) = scale · dL/dscale, dL/dscale = mean over anchors of (E_p[S] − S_kk), both sides / 2.
            scale_grad = scale64 * ((mean_sim_i + mean_sim_t).mean() / 2 - positive64.mean())
            self._last = {"loss": value, "objective": value, "tau_img_mean": 1.0 / scale,
                          "tau_txt_mean": 1.0 / scale, "logit_scale": scale}
        rows = columns = None
        if torch.is_grad_enabled() and (batch.image.requires_grad or batch.text.requires_grad):
            with torch.no_grad():
                rows, columns = _coefficients(img, txt, sim_rows, sim_cols, log_norm_i.to(dtype),
                                              log_norm_t.to(dtype), scale, batch)
        return with_closed_form_gradient(value, batch.image, batch.text, rows, columns, batch.image_all,
                                         batch.text_all, self.logit_scale, scale_grad.to(self.logit_scale.dtype))


def _coefficients(img: SoftmaxSums, txt: SoftmaxSums, sim_rows: Tensor, sim_cols: Tensor, log_norm_i: Tensor,
                  log_norm_t: Tensor, scale: Tensor, batch: GlobalBatch) -> tuple[Tensor, Tensor]:
    """dL/dS = scale/(2B)·(P^I + P^T^T − 2I) at this process's rows and columns (P: the softmaxes), times W.

    Built in place over the anchors' exponentials; ``log_norm_*`` are global (length B).
    """
    size, offset, world = batch.size, batch.offset, batch.world_size
    factor = scale * world / (2 * size)
    if world == 1:
        rows = img.exps.mul_((factor / img.total)[:, None]).addcmul_(txt.exps.T, (factor / txt.total)[None, :])
        rows.diagonal().sub_(2.0 * factor)
        return rows, rows
    # the other processes' anchors at this process's samples: softmax entries from their exchanged log-norms
    rows = img.exps.mul_((factor / img.total)[:, None])
    rows.add_((sim_rows * scale).sub_(log_norm_t[None, :]).exp_(), alpha=factor)
    rows.diagonal(offset).sub_(2.0 * factor)
    columns_t = txt.exps.mul_((factor / txt.total)[:, None])
    columns_t.add_((sim_cols.T * scale).sub_(log_norm_i[None, :]).exp_(), alpha=factor)
    columns_t.diagonal(offset).sub_(2.0 * factor)
    return rows, columns_t.T
