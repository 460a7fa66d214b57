"""SigLIP's pairwise sigmoid loss as a baseline, through open_clip's ``SigLipLoss`` (design.md §4.5b)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
from torch import Tensor, nn

from clip_dro.distributed import process_group
from clip_dro.losses.base import ContrastiveLoss, LearnedLogitScale

# open_clip_train's initialisation under --siglip (the SigLIP paper's): scale 10, bias -10.
INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0


class _MeanGradientOverProcesses(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the processes, as DDP would for a wrapped
    parameter (the loss module is not wrapped, see SigLIPLoss)."""

    @staticmethod
    def forward(ctx, scale: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        return scale.clone(), bias.clone()

    @staticmethod
    def backward(ctx, scale_grad: Tensor, bias_grad: Tensor) -> tuple[Tensor, Tensor]:
        grads = torch.stack([scale_grad, bias_grad])
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
        return grads[0], grads[1]


class SigLIPLoss(LearnedLogitScale, ContrastiveLoss):
    """open_clip's ``SigLipLoss`` (its default bidirectional neighbour exchange under torch.distributed) with a
    learnable ``logit_scale`` (log space, initialised to log 10) and ``logit_bias`` (initialised to -10) owned
    by this module, as open_clip_train initialises them under ``--siglip``. Put ``loss.parameters()`` in the
    optimizer and call ``after_optimizer_step()`` after each step: it clamps the logit scale to [0, log 100]
    as open_clip's training loop does. The indices are checked and otherwise unused (no per-sample state);
    the ``loss.*`` keywords are accepted and unused. ``tau_img``/``tau_txt``: 1/exp(logit_scale), expanded.

    Distributed (W processes, b pairs each, B = W·b): open_clip's loss on process r is
    (1/b)·Σ_{i∈r} Σ_j ℓ_ij, whose gradient reaches the other processes' text features through the exchange;
    after DDP's mean the towers get the gradient of the one-process loss (1/B)·Σ_ij ℓ_ij. The scale and bias,
    unwrapped, would get only their own process's terms: their gradient is averaged over the processes in
    backward, which gives the same global gradient on every process. The returned value is the one-process
    loss (the mean over the processes, the gradient unchanged). ``stats()``: ``loss`` = ``objective``,
    ``tau_img_mean`` = ``tau_txt_mean`` = 1/scale, ``logit_scale`` (the scale), ``logit_bias``.
    """

    def __init__(self, num_images: int, num_texts: int, *, init_logit_scale: float = INIT_LOGIT_SCALE,
                 init_logit_bias: float = INIT_LOGIT_BIAS, **kwargs) -> None:
        super().__init__(num_images, num_texts, **kwargs)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        rank, world_size = process_group()
        self.siglip = OpenClipSigLipLoss(rank=rank, world_size=world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, image_index: Tensor,
                text_index: Tensor) -> Tensor:
        # No global batch is gathered: open_clip's loss exchanges the text features itself.
        _, world_size = self._check_inputs(image_features, text_features, image_index, text_index)
        dtype = torch.float64 if torch.float64 in (image_features.dtype, text_features.dtype) else torch.float32
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            # In the features' precision, so that the processes' gradients are averaged before rounding to the
            # parameters' float32, as one process rounds its gradient once.
            scale, bias = self.logit_scale.to(dtype), self.logit_bias.to(dtype)
            if world_size > 1:
                scale, bias = _MeanGradientOverProcesses.apply(scale, bias)
            loss = self.siglip(image_features.to(dtype), text_features.to(dtype), scale.exp(), bias)
        value = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        with torch.no_grad():
            scale_now = self.logit_scale.detach().exp()
            self._last = {"loss": value, "objective": value, "tau_img_mean": 1.0 / scale_now,
                          "tau_txt_mean": 1.0 / scale_now, "logit_scale": scale_now,
                          "logit_bias": self.logit_bias.detach().clone()}
        self._count_step()
        return loss + (value - loss.detach())
