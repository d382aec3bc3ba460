"""Normalised HSIC (kernel CKA) with Gaussian kernels: the Curriculum Mentor's dependence measure.

Everything stays on the tensors' device. Inputs are centred and rescaled to unit mean square before
the kernel (bandwidth σ²·d as in the reference), which makes nHSIC invariant to the scale and offset
of a feature map and keeps exp() away from underflow when activations grow.
"""

from __future__ import annotations

import torch


def gaussian_kernel(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-|a_i - a_j|² / (2σ²d)) on features centred and scaled to unit mean square.

    The Gram matrix of the centred features is formed in the input's precision and the unit-mean-
    square scaling is applied to it (its diagonal holds the squared norms), so the only copy of a
    feature map that autograd keeps is the centred one: on a large Z this term would otherwise
    hold several feature-sized tensors, more than the output module itself. Distances, exp and
    everything after run in float64 on the (m x m) matrices, which costs nothing and keeps the
    near-flat kernels of σ = 5 from losing their signal to rounding.
    """
    a = a.flatten(1).float()
    a = a - a.mean(0, keepdim=True)
    gram = (a @ a.T).double()
    sq_norms = gram.diagonal()
    mean_square = (sq_norms.mean() / a.shape[1]).clamp_min(1e-12)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0) / mean_square
    return torch.exp(-sq_dist / (2.0 * sigma**2 * a.shape[1]))


def _centre(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k_a: torch.Tensor, k_b: torch.Tensor) -> torch.Tensor:
    """HSIC = tr(K_a H K_b H) / m², using tr(H K_a H K_b) = sum(centred K_a ∘ K_b)."""
    m = k_a.shape[0]
    return (_centre(k_a) * k_b).sum() / m**2


def nhsic(a: torch.Tensor, b: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """HSIC(A,B) / sqrt(HSIC(A,A)·HSIC(B,B)), in [0, 1]; 1 for identical inputs."""
    k_a, k_b = gaussian_kernel(a, sigma), gaussian_kernel(b, sigma)
    denom = (hsic(k_a, k_a) * hsic(k_b, k_b)).clamp_min(1e-24).sqrt()
    return (hsic(k_a, k_b) / denom).float()
