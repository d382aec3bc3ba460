import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neulite.algorithms.hsic import nhsic


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(4, 40), d=st.integers(1, 30))
def test_identical_inputs_give_one(seed: int, m: int, d: int):
    a = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    assert abs(nhsic(a, a).item() - 1.0) < 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e3), shift=st.floats(-10, 10))
def test_scale_and_offset_invariance_and_symmetry(seed: int, scale: float, shift: float):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(32, 8, generator=g), torch.randn(32, 5, generator=g)
    b = b + a[:, :5]  # dependent
    base = nhsic(a, b).item()
    assert abs(nhsic(a * scale + shift, b).item() - base) < 1e-3  # float32 inputs: shift + scale*a rounds
    assert abs(nhsic(b, a).item() - base) < 1e-6
    assert 0.0 <= base <= 1.0 + 1e-6


def test_near_zero_for_independent_data_and_high_for_dependent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 10, generator=g), torch.randn(1000, 10, generator=g)
    assert nhsic(a, b).item() < 0.02
    assert nhsic(a, a + 0.1 * b).item() > 0.9


def test_feature_maps_and_labels():
    x = torch.randn(16, 3, 8, 8)
    y = torch.nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    assert abs(nhsic(x, x.clone()).item() - 1.0) < 1e-5
    value = nhsic(x, y)
    assert torch.isfinite(value) and 0 <= value.item() <= 1


def test_constant_features_do_not_produce_nan():
    a = torch.ones(16, 4)
    b = torch.randn(16, 4)
    value = nhsic(a, b)
    assert torch.isfinite(value) and value.item() == 0.0


def test_gradients_are_finite():
    a = torch.randn(32, 16, requires_grad=True)
    b = torch.randn(32, 4)
    nhsic(a, b).backward()
    assert torch.isfinite(a.grad).all()
