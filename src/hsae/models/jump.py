"""JumpReLU and its Heaviside step with straight-through estimators for the threshold
(Rajamanoharan et al. 2024, "Jumping Ahead"), shared by the jumprelu and forest families.

JumpReLU(z) = z * H(z - theta). H has no useful gradient, so theta learns through a rectangle
kernel K of width `eps` (the bandwidth):
  d JumpReLU(z) / d theta = -(theta / eps) K((z - theta) / eps),  d H(z - theta) / d theta = -(1 / eps) K(...).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > theta)
        grad_theta = (-(theta / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (-(1.0 / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


def jumprelu(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """z * H(z - theta), with the straight-through gradient for theta (per latent, (n_latents,))."""
    return _JumpReLU.apply(z, theta, eps)


def heaviside_step(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(z - theta) as z's dtype (L0 terms), with the straight-through gradient for theta only."""
    return _Step.apply(z, theta, eps)
