"""An independent check of `neulite.memory.measure`: a client's peak resident memory, read by code
of its own.

A child Python starts with MALLOC_MMAP_THRESHOLD_ at one page (`HEAP_BLOCK`), so glibc gives every
block from a page up its own mapping and returns it when freed: resident memory then follows live memory. On one
thread, it trains a twin client one step (kernels compiled, caches filled), restarts the
high-water mark (/proc/self/clear_refs), trains a client that received only its tensors for
`steps` steps and reports the high-water mark above the resident size at the restart.
Use: `resident_peak(net, plan, batch_size, loss)`; `python benchmarks/rss_check.py` is the child.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import torch

from neulite.memory import HEAP_BLOCK, StepLoss
from neulite.models.arrays import assign_arrays, extract_arrays
from neulite.models.stage_net import StageNet, StagePlan
from neulite.optim import SGD


def resident_peak(net: StageNet, plan: StagePlan, batch_size: int, loss: StepLoss, steps: int = 2) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(HEAP_BLOCK), "OMP_NUM_THREADS": "1"}
    payload = pickle.dumps((net, plan, batch_size, loss, steps))
    done = subprocess.run([sys.executable, __file__], input=payload, capture_output=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode()[-2000:])
    return int(done.stdout.split()[-1])


def _train(
    client: StageNet, arrays: dict[str, torch.Tensor], plan: StagePlan, batch_size: int, loss: StepLoss, steps: int
) -> None:
    assign_arrays(client, arrays)
    optimizer = SGD(client.prepare(plan), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, *client.model.input_shape)
    y = torch.randint(0, client.model.num_classes, (batch_size,))
    for _ in range(steps):
        loss(client, plan, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def main() -> None:
    net, plan, batch_size, loss, steps = pickle.load(sys.stdin.buffer)
    arrays = extract_arrays(net, net.down_names(plan))
    twin, client = copy.deepcopy(net).to("meta"), copy.deepcopy(net).to("meta")
    del net
    _train(twin, arrays, plan, batch_size, loss, 1)
    del twin
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _train(client, arrays, plan, batch_size, loss, steps)
    print((_kib("VmHWM") - base) * 1024)


if __name__ == "__main__":
    main()
