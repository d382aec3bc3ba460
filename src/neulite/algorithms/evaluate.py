"""Accuracy and loss of a stage model (or the whole model) on a data set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neulite.data.datasets import TensorDataset
from neulite.models.stage_net import StageNet, StagePlan


@torch.inference_mode()
def evaluate(net: StageNet, plan: StagePlan, data: TensorDataset, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of [θ_1..θ_t, Op_t] in eval mode."""
    was_training = net.training
    net.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        _, logits = net.stage_forward(x, plan)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    net.train(was_training)
    return correct / len(data), loss / len(data)
