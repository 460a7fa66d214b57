"""Gradient caching (``train.accum_steps``): a global batch beyond one device's memory, with the same step.

Splitting a contrastive batch and summing the micro-batches' losses is wrong (negatives must span the whole
batch). Instead (GradCache, Gao et al. 2021; open_clip's ``--accum-freq``):

1. every micro-batch is forwarded without a graph and the features are kept (B x D, small);
2. the loss, and its per-sample state update, run once on the whole batch's features exactly as without
   accumulation; backward stops at the features, giving dL/d(features) (with the losses' own factor W for
   DDP's averaging, and any loss scaling of accelerate's, unchanged);
3. each micro-batch is forwarded again, with its graph, and backpropagated with its slice of that gradient,
   DDP synchronizing the summed gradients only on the last one.

Only one micro-batch's activations are alive at a time. Each re-forward restores the random state its first
forward saw, so towers with dropout compute the same features twice. BatchNorm in train mode sees
micro-batch statistics (as in open_clip); its running averages are updated once per micro-batch, by the first
forward (the re-forward's update is undone).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from torch import Tensor, nn

Features = tuple[Tensor, Tensor]


def train_mode_batchnorm(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that use batch statistics (train mode)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


class _RandomState:
    """The CPU and (when in use) accelerator random state at one moment, to replay a forward pass."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """A block in which the random state is the saved one; the global state is left as it was."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class TowerForward:
    """The towers' forward pass of a training step, whole (``micro_batches`` = 1) or by gradient caching.

    ``features(images, tokens)`` returns (image, text) features for the loss; after ``accelerator.backward``
    of the loss, ``backward_towers(image, text)`` carries the gradient into the towers (nothing to do when the
    batch went through whole: the features were already connected to them).
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, micro_batches: int):
        self.accelerator, self.model, self.micro_batches = accelerator, model, micro_batches
        self._inputs: list[tuple[Tensor, Tensor, _RandomState]] = []

    def _forward(self, images: Tensor, tokens: Tensor) -> Features:
        with self.accelerator.autocast():
            out = self.model(images, tokens)
        return out[0], out[1]

    def features(self, images: Tensor, tokens: Tensor) -> Features:
        if self.micro_batches == 1:
            return self._forward(images, tokens)
        self._inputs = []
        parts: list[Features] = []
        with torch.no_grad():
            for chunk_images, chunk_tokens in zip(images.chunk(self.micro_batches), tokens.chunk(self.micro_batches)):
                self._inputs.append((chunk_images, chunk_tokens, _RandomState(chunk_images.device)))
                parts.append(self._forward(chunk_images, chunk_tokens))
        # Leaves that require grad: the loss's backward stops here and leaves dL/d(features) in their .grad.
        image, text = (torch.cat(side).requires_grad_() for side in zip(*parts))
        return image, text

    def backward_towers(self, image: Tensor, text: Tensor) -> None:
        if self.micro_batches == 1:
            return
        grads = zip(image.grad.chunk(self.micro_batches), text.grad.chunk(self.micro_batches))
        running = _snapshot(train_mode_batchnorm(self.model))
        last = len(self._inputs) - 1
        for number, ((chunk_images, chunk_tokens, random_state), (d_image, d_text)) in enumerate(
                zip(self._inputs, grads)):
            # DDP all-reduces on the last micro-batch only, the gradients summed over all of them by then.
            sync = nullcontext() if number == last else self.accelerator.no_sync(self.model)
            with random_state.replay(), sync:
                micro_image, micro_text = self._forward(chunk_images, chunk_tokens)
                torch.autograd.backward((micro_image, micro_text), (d_image, d_text))
        _restore(running)
        self._inputs = []


def _snapshot(layers: list[nn.modules.batchnorm._BatchNorm]) -> list[tuple[Tensor, Tensor]]:
    """Copies of the running averages (and batch counters) of ``layers``."""
    return [(buffer, buffer.clone()) for layer in layers for buffer in layer.buffers()]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def describe_batchnorm(model: nn.Module, micro_batches: int) -> Optional[str]:
    """The start-up note for gradient caching over towers with train-mode BatchNorm, or None."""
    layers = train_mode_batchnorm(model)
    if micro_batches == 1 or not layers:
        return None
    return (f"train.accum_steps={micro_batches}: {len(layers)} BatchNorm layers in train mode normalize each "
            f"micro-batch with its own statistics (as open_clip's --accum-freq), so the step is not the unsplit "
            f"batch's; model.image_batchnorm=frozen makes it equal")
