"""The optimiser every client and every measurement of a client's step trains with."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    """Stochastic gradient descent with momentum and weight decay: `torch.optim.SGD`'s update as it
    runs on a CPU (one tensor at a time, no dampening, not Nesterov), bit for bit.

    Not `torch.optim` itself: its first step imports torch's compiler, which took 3.5 s and 71 MiB
    of resident memory in a process here. A client's process pays that for every Flower message it
    trains, and 71 MiB is more than a small model's whole training stage on a device whose memory
    is the point. The state is one momentum buffer per parameter, as `torch.optim.SGD`'s.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum:
                buffer = self.momentum_buffers[i]
                if buffer is None:
                    buffer = self.momentum_buffers[i] = grad.clone()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)

    def zero_grad(self) -> None:
        """Drop the gradients (not zero them): the next backward allocates them anew, so they take no
        memory during the next forward."""
        for param in self.params:
            param.grad = None
