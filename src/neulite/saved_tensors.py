"""Counting the activations autograd saves for backward.

The block partitioner's cost measure (each layer's share of them) and a diagnostic of the memory
estimate (a stage's saved activations), so both count the same way.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Hashable, Iterable

import torch


class SavedTensorCounter:
    """Bytes of every storage autograd saves, each counted once, under the current `section`.

    Storages of the `exclude` tensors (parameters, the input batch) are left out: they are counted
    apart. Use as `with counter.hooks(): forward...`; set `section` between pieces of the forward
    to attribute the bytes to them.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self._packed: list[tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = []
        self.section: Hashable = None
        self.bytes: dict[Hashable, int] = defaultdict(int)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes[self.section] += storage.nbytes()
        packed = t.detach()  # detached: holding the tensor itself would tie the graph in a reference cycle
        self._packed.append((weakref.ref(t), weakref.ref(packed)))
        return packed

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def held(self) -> int:
        """Bytes of the saved storages still alive, held by autograd's saved tensors or by what they
        were saved from (call between forward and backward). `bytes` counts a storage by its address
        when first saved, which a graph dropped during the forward (a checkpoint nested in a
        recomputed one) frees for a later one to reuse; what is alive now does not depend on addresses."""
        storages = {}
        for refs in self._packed:
            for t in (ref() for ref in refs):
                if t is not None:
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(n for ptr, n in storages.items() if ptr not in self._excluded)
