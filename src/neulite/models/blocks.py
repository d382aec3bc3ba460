"""The block abstraction: an ordered list of blocks plus a head.

Progressive training needs nothing more from a network than this split. Every built-in model and
every user model is a `BlockModel`; output modules, memory accounting and the algorithms all work
from the blocks' output shapes, found once by a probe forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import nn

from neulite.errors import NeuliteError

MAP, TOKENS, FLAT = "map", "tokens", "flat"
"""What a block returns: a channels-first feature map, (C, L) of a sequence or (C, H, W) of an image;
a sequence of tokens (N, D); or a flat vector (F,)."""


def feature_kind(shape: Sequence[int], block: nn.Module) -> str:
    """The kind of `block`'s output of `shape`. A 2-D output is a (C, L) map where the block's last
    conv/linear layer is a `Conv1d`, else (N, D) tokens (a Transformer's, whose last layer is linear)."""
    if len(shape) != 2:
        return MAP if len(shape) == 3 else FLAT
    layers = [m for m in block.modules() if isinstance(m, LAYERS)]
    return MAP if layers and isinstance(layers[-1], nn.Conv1d) else TOKENS


def global_pool(x: torch.Tensor, kind: str = MAP) -> torch.Tensor:
    """(B, C) from a feature of `kind`: the average over a map's positions or over the tokens;
    flat features pass through."""
    if kind == TOKENS:
        return x.mean(dim=1)
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def channels(shape: Sequence[int], kind: str) -> int:
    """The feature width of a block's output: C of a map, D of tokens, F of a flat vector."""
    return shape[-1] if kind == TOKENS else shape[0]


class ClassifierHead(nn.Module):
    """Global average pooling (`global_pool` of a feature of `kind`) followed by a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, kind: str = MAP) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_pool(x, self.kind))


class BlockModel(nn.Module):
    """A network as blocks θ_1..θ_T and a head; `forward` is head(θ_T(...θ_1(x))). `block_shapes`
    and `block_kinds` (`feature_kind`) say what each block returns. Each parameter must belong to
    one block or the head; modules that would change a block's input in place are made out of place."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        if len(blocks) == 0 or not all(isinstance(b, nn.Module) for b in blocks):
            raise NeuliteError("model cannot be split: `blocks` must be a non-empty list of nn.Module")
        if not isinstance(head, nn.Module):
            raise NeuliteError("model cannot be split: `head` must be an nn.Module")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self._refuse_shared_parameters()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.block_shapes = self._probe_shapes()
        self.block_kinds = [feature_kind(s, b) for s, b in zip(self.block_shapes, self.blocks, strict=True)]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def _refuse_shared_parameters(self) -> None:
        """A parameter in two blocks (or a block and the head) would change while its block is
        frozen, under the next one's training, and be averaged twice under two names."""
        owner: dict[int, tuple[str, str]] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            top, index, *_ = [*name.split("."), ""]
            part = f"block {int(index) + 1}" if top == "blocks" else f"the {top}"
            first = owner.setdefault(id(p), (part, name))
            if first[0] != part:
                raise NeuliteError(
                    f"model cannot be split: {first[1]} and {name} are one parameter, shared by {first[0]} and "
                    f"{part}; block-wise training freezes a block while later ones train, so each parameter "
                    "must belong to one block or the head"
                )

    def _probe_shapes(self) -> list[tuple[int, ...]]:
        """Per-block output shape (without batch), from a forward pass on two zero samples.

        A block or head that changes its input in place would change a tensor that neulite also
        feeds elsewhere (output modules, the Mentor, DepthFL's exits): its modules that can act in
        place (`nn.ReLU(inplace=True)`, ...) are switched to out of place, which computes the same;
        other in-place code is refused by name."""
        parts = [*self.blocks, self.head]
        shapes, changed = self._probe()
        if changed:
            for i in changed:
                for m in parts[i].modules():
                    if getattr(m, "inplace", None) is True:
                        m.inplace = False
            shapes, changed = self._probe()
        if changed:
            what = ", ".join("the head" if i == len(self.blocks) else f"block {i + 1}" for i in changed)
            raise NeuliteError(
                f"model cannot be split: {what}: the forward changes its input in place (x.relu_(), x += ...), "
                "a tensor neulite also feeds to other modules; compute it out of place"
            )
        return shapes

    def _probe(self) -> tuple[list[tuple[int, ...]], list[int]]:
        """Per-block output shapes, and which blocks (0..T-1) and head (T) changed their input in place."""
        shapes: list[tuple[int, ...]] = []
        changed: list[int] = []
        with torch.device("cpu") if on_meta(self) else contextlib.nullcontext():
            model = cpu_twin(self)
            was_training = model.training
            model.eval()
            x = torch.zeros(2, *self.input_shape)
            try:
                with torch.no_grad():
                    for i, block in enumerate(model.blocks):
                        version, x_in = x._version, x
                        x = block(x)
                        if x_in._version != version:
                            changed.append(i)
                        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3, 4):
                            got = f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}"
                            raise NeuliteError(
                                f"model cannot be split: block {i + 1} must return a (B, C, H, W) or (B, C, L) map, "
                                f"(B, N, D) tokens or a (B, F) vector, got {got}"
                            )
                        shapes.append(tuple(x.shape[1:]))
                    version = x._version
                    logits = model.head(x)
                    if x._version != version:
                        changed.append(len(model.blocks))
            except NeuliteError:
                raise
            except Exception as exc:  # a user's blocks that do not chain: name the problem, not torch's internals
                raise NeuliteError(
                    f"model cannot be split: forward through blocks failed for input shape {self.input_shape}: {exc}"
                ) from None
            finally:
                model.train(was_training)
        if tuple(logits.shape) != (2, self.num_classes):
            raise NeuliteError(
                f"model cannot be split: head returns shape {tuple(logits.shape[1:])}, expected ({self.num_classes},)"
            )
        return shapes, changed


def on_meta(module: nn.Module) -> bool:
    """Whether `module` is a skeleton on the meta device (a client's, which holds no weights)."""
    return any(p.is_meta for p in module.parameters())


def cpu_twin(module: nn.Module) -> nn.Module:
    """`module` to run for shapes: itself, or for a skeleton on the meta device an uninitialised CPU
    twin. On meta tensors torch runs ops through its Python references, whose first call imports
    torch's compiler (3 s of every client process's start), and every storage has address 0. The
    twin lives only for the probe: building ResNet-18's skeleton peaks 61 MiB above the process's
    resident memory with it, 100 MiB with the compiler's import before. Call it under `torch.device("cpu")` so that the ops' new tensors are CPU tensors too."""
    if not on_meta(module):
        return module
    # not `to_empty`: its `empty_like` of a meta tensor runs torch's Python reference, whose first
    # call imports sympy (0.8 s of a client process's start); `empty` from the shape does not
    return copy.deepcopy(module)._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))


def reset_parameters(module: nn.Module) -> nn.Module:
    """Re-initialise every submodule that knows how (used for fresh copies of the head)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    return module


def fresh_head(model: BlockModel) -> nn.Module:
    """A newly initialised classifier with the real head's shape."""
    return reset_parameters(copy.deepcopy(model.head))


LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""The layers a block's Harmonizer tail is made of (`tail_modules`): every block needs one."""


def tail_modules(block: nn.Module, name: str = "a block") -> list[str]:
    """Names of a block's last parametrised layer(s): the last conv/linear and the norms after it,
    or only those norms where the conv/linear is the block's only one (a block of one layer).

    The Harmonizer keeps these trainable at the next stage so that block t's gradient reaches
    into block t-1. A tail is a part of the block: with one layer per block, the whole previous
    block would train at every stage, costing its gradients and momentum (on a weight-heavy CNN
    the last stage then needs 98% of full-model training's memory, 92% with the norm alone).
    """
    leaves = [
        (n, m)
        for n, m in block.named_modules()
        if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    for i in range(len(leaves) - 1, -1, -1):
        if isinstance(leaves[i][1], LAYERS):
            first = i + 1 if i == 0 else i  # the block's only conv/linear: its norms alone
            return [n for n, _ in leaves[first:]]
    raise NeuliteError(
        f"model cannot be split: {name} has no conv or linear layer, and the Training Harmonizer keeps a block's last "
        "one trainable at the next stage (its tail): merge the block into a neighbour, or set "
        "method.neulite.harmonizer = false"
    )
