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
    """Bytes of the storages autograd saves for backward and still holds, each under the `section`
    that saved it first.

    Storages of the `exclude` tensors (parameters, the input batch) are left out: they are counted
    apart. Use as `with counter.hooks(): forward...`; set `section` between pieces of the forward
    to attribute the bytes to them, and read `held()` before backward frees them.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._packed: list[tuple[Hashable, weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = []
        self.section: Hashable = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        packed = t.detach()  # detached: holding the tensor itself would tie the graph in a reference cycle
        self._packed.append((self.section, weakref.ref(t), weakref.ref(packed)))
        return packed

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def held(self) -> dict[Hashable, int]:
        """Bytes of the saved storages still alive, held by autograd's saved tensors or by what they
        were saved from, by section (0 for a section that holds none). Counted by what is alive, not
        by address when saved: a graph dropped during the forward (a checkpoint nested in a
        recomputed one) frees its storages' addresses for later ones to reuse."""
        storages: dict[int, tuple[Hashable, int]] = {}
        for section, *refs in self._packed:
            for t in (ref() for ref in refs):
                if t is not None:
                    storage = t.untyped_storage()
                    storages.setdefault(storage.data_ptr(), (section, storage.nbytes()))
        by_section: dict[Hashable, int] = defaultdict(int)
        for ptr, (section, nbytes) in storages.items():
            if ptr not in self._excluded:
                by_section[section] += nbytes
        return by_section
