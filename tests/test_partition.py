import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neulite
from examples.user_cnns import plain_cnn
from neulite.algorithms.neulite import neulite_loss
from neulite.config import load_config
from neulite.errors import NeuliteError
from neulite.memory import estimate
from neulite.models import balance, zoo
from neulite.models.balance import balanced_cuts, split_at, unit_costs, units
from neulite.models.blocks import BlockModel, ClassifierHead
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_balanced_cuts_minimise_the_largest_block():
    assert balanced_cuts([5, 1, 1, 1, 5], 3) == [1, 4]
    assert balanced_cuts([1, 1, 1, 1], 2) == [2]
    assert balanced_cuts([3], 1) == []
    with pytest.raises(NeuliteError, match="cannot be split"):
        balanced_cuts([1, 2], 3)


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=8), data=st.data())
def test_balanced_cuts_are_optimal_among_cuts_that_give_every_block_a_layer(costs: list[int], data: st.DataObject):
    import itertools

    layers = data.draw(st.lists(st.booleans(), min_size=len(costs), max_size=len(costs)).filter(any))
    k = data.draw(st.integers(1, sum(layers)))
    cuts = balanced_cuts(costs, k, layers)
    assert len(cuts) == k - 1 and cuts == sorted(set(cuts)) and all(0 < c < len(costs) for c in cuts)

    def blocks(cs: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
        bounds = [0, *cs, len(costs)]
        return list(zip(bounds, bounds[1:], strict=False))

    def worst(cs: tuple[int, ...] | list[int]) -> int:
        return max(sum(costs[a:b]) for a, b in blocks(cs))

    valid = [
        c for c in itertools.combinations(range(1, len(costs)), k - 1) if all(any(layers[a:b]) for a, b in blocks(c))
    ]
    assert all(any(layers[a:b]) for a, b in blocks(cuts))
    assert worst(cuts) == min(map(worst, valid))
    with pytest.raises(NeuliteError, match=f"{sum(layers) + 1} blocks requested from {len(costs)} sequential units"):
        balanced_cuts(costs, sum(layers) + 1, layers)


def test_a_network_whose_first_unit_is_a_flatten_is_cut_with_a_layer_in_every_block():
    """A user's MLP: its Flatten is a unit without parameters, which a block of its own could not
    train (no Harmonizer tail); `model.blocks` may ask for one block per linear layer, not more."""

    def mlp(shape: tuple[int, int, int], k: int, width: float = 1.0) -> BlockModel:
        layers = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())]
        layers += [nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU()) for _ in range(3)]
        return BlockModel(layers, nn.Linear(32, k), shape, k)

    neulite.register_model("test_flatten_mlp")(mlp)
    net = StageNet(build_model("test_flatten_mlp", (1, 8, 8), 10, blocks=4))
    assert [len(b) for b in net.model.blocks] == [2, 1, 1, 1]  # the Flatten with the first linear layer
    assert all(any(isinstance(m, nn.Linear) for m in b.modules()) for b in net.model.blocks)
    assert [net.tail(b) for b in range(4)] == [
        [],
        ["model.blocks.1.0.1"],
        ["model.blocks.2.0.1"],
        ["model.blocks.3.0.1"],
    ]
    with pytest.raises(
        NeuliteError, match="5 blocks requested from 5 sequential units, 4 of them with a conv or linear"
    ):
        build_model("test_flatten_mlp", (1, 8, 8), 10, blocks=5)


def test_units_keep_each_layer_with_its_norm_and_activation():
    model = BlockModel(
        [
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        ],
        ClassifierHead(4, 2),
        (1, 8, 8),
        2,
    )
    pieces = units(model)
    assert len(pieces) == 3 and isinstance(pieces[2], nn.MaxPool2d)
    costs = unit_costs(model, batch_size=2)
    # unit 1 saves the conv's input (2x1x8x8 floats), the conv output for BN and ReLU's output
    # (2x4x8x8 each), BN's batch mean/invstd and running stats (4 x 4 floats); plus 3x its params
    saved = (2 * 1 * 8 * 8 + 2 * (2 * 4 * 8 * 8) + 4 * 4) * 4
    assert costs[0] == saved + 3 * (4 * 9 + 4 + 4 + 4) * 4


def test_rebalanced_resnet_needs_less_than_one_block_per_stage():
    per_stage = StageNet(build_model("resnet18", (3, 32, 32), 10, width=0.5))
    balanced = StageNet(build_model("resnet18", (3, 32, 32), 10, width=0.5, blocks=4))
    assert balanced.num_stages == 4

    def worst(net: StageNet) -> int:
        loss = functools.partial(neulite_loss, lambda1=1.0, lambda2=1.0, sigma=5.0)
        return max(estimate(net, net.plan(t, harmonize=True, mentor=True), 32, loss).total for t in range(1, 5))

    assert worst(balanced) < worst(per_stage)
    x = torch.randn(2, 3, 32, 32)
    fresh = build_model("resnet18", (3, 32, 32), 10, width=0.5, blocks=4)  # what loading a checkpoint builds
    fresh.load_state_dict(balanced.model.state_dict())
    balanced.eval()
    fresh.eval()
    with torch.no_grad():
        assert balanced.model(x).shape == (2, 10)
        assert torch.equal(fresh(x), balanced.model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "vit_tiny", "examples.user_cnns:plain_cnn"])
def test_unit_costs_from_two_small_batches_are_a_forward_at_the_batch(name: str):
    model = build_model(name, (3, 32, 32), 10, width=0.25)
    direct = [
        saved + 3 * sum(p.numel() * p.element_size() for p in piece.parameters())
        for saved, piece in zip(balance._saved_bytes(model, 48), units(model), strict=True)
    ]
    assert unit_costs(model, 48) == direct


def test_balanced_cuts_are_the_same_at_every_width():
    full = build_model("resnet18", (3, 32, 32), 10, blocks=5)
    narrow = build_model("resnet18", (3, 32, 32), 10, width=0.25, blocks=5)
    assert set(full.state_dict()) == set(narrow.state_dict())
    assert [len(b) for b in full.blocks] == [len(b) for b in narrow.blocks]


def test_a_client_skeleton_on_the_meta_device_is_cut_where_the_server_cuts():
    # a Flower client process builds only the skeleton, on the meta device: its cuts must not differ
    zoo._units_at_full_width.cache_clear()
    with torch.device("meta"):
        skeleton = build_model("small_cnn", (1, 28, 28), 10, blocks=2)
    zoo._units_at_full_width.cache_clear()
    server = build_model("small_cnn", (1, 28, 28), 10, blocks=2)
    assert [len(b) for b in skeleton.blocks] == [len(b) for b in server.blocks]
    assert skeleton.state_dict().keys() == server.state_dict().keys()
    with torch.device("meta"):  # a user's own skeleton, regrouped
        user = build_model("small_cnn", (1, 28, 28), 10)
        user = split_at(user, balanced_cuts(unit_costs(user, 64), 2))
    assert [len(b) for b in user.blocks] == [len(b) for b in server.blocks]


SKELETON_NETS = (("resnet18", 0), ("mobilenetv2", 3), ("vit_tiny", 0))  # (built-in, blocks), and a user's plain CNN
SKELETONS = f"""
import sys, torch
from examples.user_cnns import plain_cnn
from neulite.models.stage_net import StageNet
from neulite.models.zoo import build_model
with torch.device("meta"):
    nets = [StageNet(build_model(n, (3, 32, 32), 10, 0.5, b)) for n, b in {SKELETON_NETS!r}]
    nets.append(StageNet(plain_cnn((3, 32, 32), 10)))
print([n.model.block_shapes for n in nets], sorted({{"torch._dynamo", "sympy"}} & set(sys.modules)))
"""


def test_a_client_skeleton_is_built_without_torchs_compiler_or_sympy_and_shaped_as_the_servers_network():
    """Each message a Flower SuperNode gets starts a process that builds the client's skeleton on the
    meta device; run there, the shape probe and weight init imported torch's compiler (3 s a message),
    and the probe's CPU twin, made with `to_empty`, sympy (0.8 s)."""
    done = subprocess.run([sys.executable, "-c", SKELETONS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    nets = [build_model(n, (3, 32, 32), 10, 0.5, b) for n, b in SKELETON_NETS]
    nets.append(plain_cnn((3, 32, 32), 10))
    assert done.stdout.strip() == f"{[n.block_shapes for n in nets]} []"


def test_config_blocks_reaches_the_model():
    from neulite.simulation import Simulation

    sim = Simulation(load_config(overrides=["model.blocks=2", "data.num_clients=4", "clients.per_round=2"]))
    assert sim.method.net.num_stages == 2
    with pytest.raises(NeuliteError, match="model.blocks"):
        load_config(overrides=["model.blocks=-1"])


def test_rebalance_a_user_model():
    blocks = [
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
    ]
    model = BlockModel(blocks, ClassifierHead(8, 3), (3, 8, 8), 3)
    split = split_at(model, balanced_cuts(unit_costs(model, 4), 2))
    assert split.num_blocks == 2 and split(torch.randn(2, 3, 8, 8)).shape == (2, 3)
