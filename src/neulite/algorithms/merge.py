"""How the server merges the replies that hold one tensor: the data-size-weighted mean, or a robust
order statistic per element (trimmed mean, median) that a minority of hostile clients cannot drag far.

Every rule works on "placed" replies: float64 tensors of the global shape with NaN wherever a client
did not hold the element (a narrower sub-model, a shorter prefix), so each element is merged over
its holders only. Robust rules weigh every holder equally: a sample count is a client's claim.
"""

from __future__ import annotations

import torch

from neulite.algorithms.payload import ClientResult
from neulite.config import ServerConfig
from neulite.models.arrays import Arrays


def merge(placed: list[torch.Tensor], weights: list[float], rule: ServerConfig) -> torch.Tensor:
    """Each element's merge over the replies that hold it (NaN where none does)."""
    if rule.aggregation == "mean":
        total = torch.zeros_like(placed[0])
        weight = torch.zeros_like(placed[0])
        for value, w in zip(placed, weights, strict=True):
            held = ~value.isnan()
            total += torch.where(held, value * w, 0.0)
            weight += held * w
        return total / weight
    stacked = torch.stack(placed)
    count = (~stacked.isnan()).sum(0)
    # median: keep the middle one, or the middle two averaged
    median = rule.aggregation == "median"
    cut = (count - 1).clamp_min(0) // 2 if median else (count * rule.trim).floor().long()
    ordered = stacked.sort(0).values  # NaN sorts last
    position = torch.arange(len(placed)).view(-1, *[1] * (stacked.dim() - 1))
    keep = (position >= cut) & (position < count - cut)
    return (ordered.nan_to_num() * keep).sum(0) / keep.sum(0)


def merge_results(results: list[ClientResult], rule: ServerConfig) -> Arrays:
    """Each tensor merged over the clients that returned it (DepthFL's prefixes differ in length).

    Floating tensors follow `rule`; integer counters take the maximum (never averaged).
    """
    if not results:
        raise ValueError("nothing to merge")
    out: Arrays = {}
    for name in dict.fromkeys(n for r in results for n in r.arrays):
        holders = [r for r in results if name in r.arrays]
        first = holders[0].arrays[name]
        if first.is_floating_point():
            merged = merge([r.arrays[name].double() for r in holders], [r.num_examples for r in holders], rule)
            out[name] = merged.to(first.dtype)
        else:
            out[name] = torch.stack([r.arrays[name] for r in holders]).amax(0)
    return out
