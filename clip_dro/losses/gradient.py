"""Attach a gradient computed in closed form to a loss value computed without autograd.

Every loss here is, for the gradient, linear in the similarity matrix with coefficients fixed during the step:
dL/dS = P. With this process's rows of S (its images against all texts) and its columns (all images against
its texts) the gradient with respect to its own features is

    dL/dx_local = P[local rows, :] @ T_all        dL/dt_local = P[:, local columns]^T @ X_all

so backward needs no communication and no second pass through the similarity computation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class _ClosedFormGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, param: Optional[Tensor], value: Tensor,  # type: ignore[override]
                rows: Optional[Tensor], columns: Optional[Tensor], image_all: Tensor, text_all: Tensor,
                param_grad: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(rows, columns, image_all, text_all, param_grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rows, columns, image_all, text_all, param_grad = ctx.saved_tensors
        d_image = (rows @ text_all).mul_(grad) if ctx.needs_input_grad[0] else None
        d_text = (columns.T @ image_all).mul_(grad) if ctx.needs_input_grad[1] else None
        d_param = param_grad * grad if ctx.needs_input_grad[2] else None
        return d_image, d_text, d_param, None, None, None, None, None, None


def with_closed_form_gradient(value: Tensor, image: Tensor, text: Tensor, rows: Optional[Tensor],
                              columns: Optional[Tensor], image_all: Tensor, text_all: Tensor,
                              param: Optional[Tensor] = None, param_grad: Optional[Tensor] = None) -> Tensor:
    """``value`` (a 0-d tensor) whose backward gives ``image`` the gradient ``rows @ text_all``, ``text`` the
    gradient ``columns.T @ image_all`` and ``param`` the gradient ``param_grad`` (all times the upstream
    gradient). ``rows``/``columns`` may be None when no feature needs a gradient."""
    return _ClosedFormGradient.apply(image, text, param, value, rows, columns, image_all, text_all, param_grad)
