"""A client's outputs of its stage model's frozen prefix, kept between rounds.

Within a stage, the blocks that a client runs without autograd (`StageNet.frozen_depth`) do not
change, so their output on the client's own training data can be kept (a device would keep it in
its storage) and a round then costs only what trains. The cache is keyed by a digest of each
frozen block's tensors: it is used only while they are exactly the ones it was computed with, and
when the next stage freezes one more block it is extended by that block alone. Exact: each sample's
features do not depend on the batch it is computed in (checked by the tests); it is off with data
augmentation (inputs change every epoch) and with drifting BatchNorm statistics (`bn_drift`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from neulite.data.datasets import TensorDataset
from neulite.memory import MIB
from neulite.models.stage_net import StageNet, StagePlan, frozen_forward

CHUNK = 256
"""Samples per forward while the cache is filled (a training step's batch bounds the peak)."""


def _digest(named: list[tuple[str, torch.Tensor]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def block_digest(block: nn.Module) -> bytes:
    """What identifies a frozen block's function: its parameters and buffers, bit for bit."""
    return _digest(list(block.state_dict().items()))


def data_digest(data: TensorDataset) -> bytes:
    """What identifies the samples the cache holds features of."""
    return _digest([("x", data.x), ("y", data.y)])


class PrefixCache:
    """One client's cached prefix output: the features of its data after `len(digests)` frozen blocks."""

    def __init__(self) -> None:
        self.data: bytes = b""
        self.digests: tuple[bytes, ...] = ()
        self.features: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else self.features.numel() * self.features.element_size()

    def prefix(self, net: StageNet, plan: StagePlan, data: TensorDataset) -> torch.Tensor | None:
        """The frozen prefix's output on `data` for `plan` (row i for sample i), or None when the
        plan has no frozen prefix, its statistics drift, or it re-runs the prefix in backward
        (`StagePlan.recompute_prefix`: a cached slice would be held through the step). `net` holds the task's tensors, its
        frozen blocks in eval mode (`StageNet.prepare`)."""
        depth = net.frozen_depth(plan)
        if depth == 0 or plan.bn_drift or plan.recompute_prefix:
            return None
        blocks = net.model.blocks
        digests = tuple(block_digest(blocks[i]) for i in range(depth))
        data_key = data_digest(data)
        same_data = self.features is not None and self.data == data_key
        if same_data and self.digests == digests:
            return self.features
        start = len(self.digests) if same_data and digests[: len(self.digests)] == self.digests else 0
        x = self.features if start else data.x
        self.data, self.digests, self.features = b"", (), None  # a failure below leaves no stale entry
        features = frozen_forward(blocks[start:depth], x, CHUNK)
        self.data, self.digests, self.features = data_key, digests, features
        return self.features


class PrefixStore:
    """The caches of the clients a process serves, within about `max_mb` in all: the least recently
    used clients' caches are evicted first (one computes its cache again when next sampled), and
    the client being served may add its own on top. `max_mb = 0` turns caching off."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * MIB)
        self._caches: OrderedDict[int, PrefixCache] = OrderedDict()

    def get(self, cid: int) -> PrefixCache | None:
        """Client `cid`'s cache (None: caching is off), after evicting others beyond the budget."""
        if self.max_bytes <= 0:
            return None
        cache = self._caches.pop(cid, None) or PrefixCache()
        while self._caches and self.nbytes + cache.nbytes > self.max_bytes:
            self._caches.popitem(last=False)
        self._caches[cid] = cache
        return cache

    def __contains__(self, cid: object) -> bool:
        """Whether client `cid` has features cached."""
        return cid in self._caches and self._caches[cid].features is not None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._caches.values())
