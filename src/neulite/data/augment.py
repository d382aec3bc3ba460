"""Batch data augmentation on tensors, so that clients need no per-sample transform pipeline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neulite.errors import NeuliteError


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) batch by `padding`, crop each sample back to H x W at a random offset
    and flip it horizontally with probability 1/2: the standard CIFAR augmentation.

    One gather for the whole batch; the result depends only on the generator's state. On normalised
    images a zero pad is the channel mean.
    """
    if x.dim() != 4:
        raise NeuliteError(f"random_crop_flip: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise NeuliteError(f"random_crop_flip: padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    rand_device = generator.device if generator is not None else torch.device("cpu")
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=rand_device).to(x.device)
    flip = (torch.rand(b, generator=generator, device=rand_device) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
