"""Data layer: loaders, client partitioners and batch augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neulite.config import load_config
from neulite.data import (
    DATASET_NAMES,
    load_dataset,
    partition,
    random_crop_flip,
    train_val_split,
)
from neulite.data.datasets import FASHION_MNIST_DIR, _digits
from neulite.errors import NeuliteError
from neulite.federation import load_splits

# ---------------------------------------------------------------- partition


def _labels(num_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=20, max_size=400).map(np.array),
    num_clients=st.integers(1, 10),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    seed=st.integers(0, 2**31),
)
def test_partition_disjoint_cover_deterministic(labels, num_clients, scheme, seed):
    kwargs = dict(alpha=0.5, shards_per_client=2, min_size=0)
    if scheme == "shards" and num_clients * 2 < len(np.unique(labels)):
        with pytest.raises(NeuliteError, match="classes"):
            partition(labels, num_clients, scheme, seed, **kwargs)
        return
    parts = partition(labels, num_clients, scheme, seed, **kwargs)
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 for p in parts)
    _assert_disjoint_cover(parts, len(labels))
    again = partition(labels, num_clients, scheme, seed, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    if scheme == "shards":
        assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_differs_across_seeds(scheme):
    labels = _labels()
    a = partition(labels, 10, scheme, seed=0)
    b = partition(labels, 10, scheme, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_classes_per_client(k):
    labels = _labels(num_classes=10, per_class=137)
    parts = partition(labels, 20, "shards", seed=3, shards_per_client=k)
    _assert_disjoint_cover(parts, len(labels))
    assert all(1 <= len(np.unique(labels[p])) <= k for p in parts)


def _top2_share(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """For each non-empty client, the share of its samples in its two most common classes."""
    shares = []
    for p in parts:
        if len(p):
            counts = np.sort(np.bincount(labels[p], minlength=10))[::-1]
            shares.append(counts[:2].sum() / len(p))
    return np.array(shares)


def test_dirichlet_alpha_controls_skew():
    labels = _labels(per_class=500)
    skewed = partition(labels, 10, "dirichlet", seed=0, alpha=0.01, min_size=0)
    uniform = partition(labels, 10, "dirichlet", seed=0, alpha=1000.0)
    assert np.mean(_top2_share(labels, skewed) > 0.9) >= 0.8
    for p in uniform:
        frac = np.bincount(labels[p], minlength=10) / len(p)
        assert np.all(np.abs(frac - 0.1) < 0.05)


def test_min_size_error_names_client_and_fix():
    labels = _labels(num_classes=2, per_class=50)
    with pytest.raises(NeuliteError, match=r"client \d+ got \d+ samples < min_size=5.*on_small='clamp'"):
        partition(labels, 20, "dirichlet", seed=0, alpha=0.01, min_size=5)


def test_min_size_clamp_tops_up_with_warning():
    labels = _labels(num_classes=2, per_class=50)
    with pytest.warns(UserWarning, match="min_size=5"):
        parts = partition(labels, 20, "dirichlet", seed=0, alpha=0.01, min_size=5, on_small="clamp")
    assert min(len(p) for p in parts) >= 5
    _assert_disjoint_cover(parts, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = partition(labels, 20, "dirichlet", seed=0, alpha=0.01, min_size=5, on_small="clamp")
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=11, scheme="iid", min_size=10), "needs 110 samples, only 100"),
        (dict(num_clients=2, scheme="nope"), "valid schemes: iid, dirichlet, shards"),
        (dict(num_clients=2, scheme="dirichlet", alpha=0.0), "alpha"),
        (dict(num_clients=2, scheme="iid", on_small="drop"), "on_small"),
        (dict(num_clients=0, scheme="iid"), "num_clients"),
        (dict(num_clients=3, scheme="shards", shards_per_client=3), "10 classes"),
    ],
)
def test_partition_bad_arguments(kwargs, match):
    with pytest.raises(NeuliteError, match=match):
        partition(_labels(per_class=10), seed=0, **kwargs)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), frac=st.floats(0, 0.99), seed=st.integers(0, 1000))
def test_train_val_split(n, frac, seed):
    indices = np.arange(100, 100 + n)
    train, val = train_val_split(indices, frac, seed)
    assert np.array_equal(np.sort(np.concatenate([train, val])), indices)
    if n >= 1 and frac > 0:
        assert len(train) >= 1
    if n >= 2 and frac > 0:
        assert len(val) >= 1
    if frac == 0:
        assert len(val) == 0
    t2, v2 = train_val_split(indices, frac, seed)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)


def test_train_val_split_rejects_bad_fraction():
    with pytest.raises(NeuliteError, match="val_fraction"):
        train_val_split(np.arange(10), 1.0, 0)


# ---------------------------------------------------------------- data sets


def test_mnist5k_shapes_and_normalisation():
    d = load_dataset("mnist5k")
    assert d.train.x.shape == (4000, 1, 28, 28) and d.test.x.shape == (1000, 1, 28, 28)
    assert len(d.train) == 4000 and len(d.test) == 1000
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert d.train.num_classes == 10 and d.input_shape == (1, 28, 28) and not d.augment
    assert abs(d.train.x.mean().item()) < 1e-3 and abs(d.train.x.std().item() - 1) < 1e-3
    assert torch.bincount(d.test.y).tolist() == [100] * 10  # stratified


def test_mnist5k_split_depends_on_seed_only():
    a, b, c = load_dataset("mnist5k", seed=0), load_dataset("mnist5k", seed=0), load_dataset("mnist5k", seed=1)
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.test.x, c.test.x)


def test_train_size_takes_a_stratified_seeded_sample():
    full = load_dataset("mnist5k")
    seed0, seed1 = (load_config(overrides=["data.train_size=1000", f"seed={s}"]) for s in (0, 1))
    a, b, c = load_splits(seed0), load_splits(seed0), load_splits(seed1)
    assert len(a.train) == 1000 and len(a.test) == len(full.test)
    assert torch.bincount(a.train.y).tolist() == (torch.bincount(full.train.y) / 4).round().int().tolist()
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    rows = {tuple(r) for r in full.train.x.flatten(1)[:, 200:260].tolist()}
    assert all(tuple(r) in rows for r in a.train.x.flatten(1)[:, 200:260].tolist())  # a subset, not new images


def test_train_size_larger_than_the_data_set_is_named():
    with pytest.raises(NeuliteError, match="data.train_size = 5000 exceeds the 4000 training samples"):
        load_splits(load_config(overrides=["data.train_size=5000"]))
    with pytest.raises(NeuliteError, match="data.train_size must be >= 0"):
        load_config(overrides=["data.train_size=-1"])


def test_digits_are_scikit_learns_as_its_loader_gives_them():
    """Read from the file scikit-learn ships, without importing it (2.9 s of each process)."""
    bunch = pytest.importorskip("sklearn.datasets").load_digits()
    images, labels = _digits()
    assert np.array_equal(images, bunch.images.reshape(-1, 1, 8, 8)) and np.array_equal(labels, bunch.target)
    d = load_dataset("digits")
    assert d.train.x.shape == (1437, 1, 8, 8) and d.test.x.shape == (360, 1, 8, 8)
    assert d.train.num_classes == 10


def test_unknown_dataset_lists_names():
    with pytest.raises(NeuliteError, match="unknown data set .imagenet.: valid names are " + ", ".join(DATASET_NAMES)):
        load_dataset("imagenet")


def _write_batch(
    path: Path, n: int, label_key: bytes, num_classes: int, rng: np.random.Generator, protocol: int = 5
) -> None:
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"filenames": [b"x.png"] * n,
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize(("nested", "protocol"), [(True, 5), (False, 2)])  # 2: the archive's own protocol
def test_cifar10_from_fake_archive(tmp_path, nested, protocol):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", 4, b"labels", 10, rng, protocol)
    _write_batch(folder / "test_batch", 3, b"labels", 10, rng, protocol)
    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.train.x.shape == (20, 3, 32, 32) and d.test.x.shape == (3, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.augment and d.train.num_classes == 10
    assert torch.allclose(d.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar100_from_fake_archive(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_batch(folder / "train", 10, b"fine_labels", 100, rng)
    _write_batch(folder / "test", 5, b"fine_labels", 100, rng)
    d = load_dataset("cifar100", root=str(folder))
    assert len(d.train) == 10 and len(d.test) == 5 and d.train.num_classes == 100


def test_cifar_missing_folder_names_files_and_folder(tmp_path):
    with pytest.raises(NeuliteError, match=r"cifar-10-batches-py/\{data_batch_1,.*test_batch\} in .*nowhere"):
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_batch_is_refused_before_it_runs_code(tmp_path):
    folder, marker = tmp_path / "cifar-100-python", tmp_path / "ran"
    folder.mkdir()
    _write_batch(folder / "test", 5, b"fine_labels", 100, np.random.default_rng(0))
    (folder / "train").write_bytes(pickle.dumps({b"data": _Payload(marker), b"fine_labels": [0]}))
    with pytest.raises(NeuliteError, match=r"corrupt CIFAR batch .*train: .*calls posix.system, which no CIFAR batch"):
        load_dataset("cifar100", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_corrupt_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    (folder / "test").write_bytes(b"")
    with pytest.raises(NeuliteError, match="corrupt CIFAR batch"):
        load_dataset("cifar100", root=str(tmp_path))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    d = load_dataset("fashion-mnist", root=str(tmp_path))
    assert d.train.x.shape == (12, 1, 28, 28) and d.test.x.shape == (5, 1, 28, 28)
    assert d.train.num_classes == 10 and not d.augment


def test_fashion_mnist_corrupt_and_missing(tmp_path):
    with pytest.raises(NeuliteError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        _write_idx(tmp_path / name, np.zeros((2, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(NeuliteError, match="corrupt IDX file .*train-labels"):
        load_dataset("fashion-mnist", root=str(tmp_path))


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_installed():
    d = load_dataset("fashion-mnist")
    assert d.train.x.shape == (60000, 1, 28, 28) and d.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.test.y).tolist() == [1000] * 10


# ---------------------------------------------------------------- augmentation


def test_augment_keeps_shape_and_is_deterministic():
    x = torch.randn(16, 3, 32, 32)
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, 4, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_augment_padding_zero_only_flips():
    x = torch.randn(64, 2, 5, 7)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all()) and same.any() and flipped.any()


def test_augment_crops_are_shifted_windows_of_padded_input():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_augment_rejects_bad_input():
    with pytest.raises(NeuliteError, match="B, C, H, W"):
        random_crop_flip(torch.zeros(3, 4, 4))
    with pytest.raises(NeuliteError, match="padding"):
        random_crop_flip(torch.zeros(1, 1, 4, 4), padding=-1)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason=f"the full Fashion-MNIST is not in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
)
def test_the_installed_fashion_mnist_is_the_full_set_the_headline_benchmark_needs():
    d = load_dataset("fashion-mnist")
    assert (len(d.train), len(d.test), d.input_shape, d.train.num_classes) == (60_000, 10_000, (1, 28, 28), 10)
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
