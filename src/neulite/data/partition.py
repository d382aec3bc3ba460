"""Split a data set's samples among federated clients, deterministically by seed.

Every partition is disjoint and covers all samples. Written with numpy rather than taken from
flwr-datasets, whose dependencies (pandas, pyarrow, datasets) weigh ~380 MB.
"""

from __future__ import annotations

import warnings

import numpy as np

from neulite.errors import NeuliteError

SCHEMES = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
    on_small: str = "error",
) -> list[np.ndarray]:
    """Sorted int64 sample indices for each of `num_clients` clients.

    - "iid": a shuffled split into sizes that differ by at most one.
    - "dirichlet": label skew as in Hsu et al. (2019): each class is divided among the clients in
      proportions drawn from Dir(alpha); small alpha gives each client few classes.
    - "shards": McMahan et al. (2017) pathological split: each class is cut into shards (their
      number proportional to the class size), and each client gets `shards_per_client` shards, so
      at most that many classes.

    A client left with fewer than `min_size` samples raises NeuliteError (on_small="error") or is
    topped up with samples taken from the largest clients, with a warning (on_small="clamp").
    """
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise NeuliteError(f"partition: labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise NeuliteError(f"partition: num_clients must be >= 1, got {num_clients}")
    if on_small not in ("error", "clamp"):
        raise NeuliteError(f"partition: on_small must be 'error' or 'clamp', got {on_small!r}")
    if min_size < 0 or num_clients * min_size > n:
        raise NeuliteError(
            f"partition: {num_clients} clients x min_size={min_size} needs {num_clients * min_size} samples, "
            f"only {n} available"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    else:
        raise NeuliteError(f"partition: unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    _enforce_min_size(parts, min_size, on_small, scheme, rng)
    return [np.sort(p) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0:
        raise NeuliteError(f"partition: dirichlet alpha must be > 0, got {alpha}")
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
        for client, piece in enumerate(np.split(idx, cuts)):
            pieces[client].append(piece)
    return [np.concatenate(p) for p in pieces]


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes, counts = np.unique(labels, return_counts=True)
    total = num_clients * per_client
    if per_client < 1 or total > len(labels):
        raise NeuliteError(
            f"partition: shards_per_client={per_client} x {num_clients} clients = {total} shards; need 1..{len(labels)}"
        )
    if total < len(classes):
        raise NeuliteError(
            f"partition: {total} shards cannot hold {len(classes)} classes without mixing classes in a shard; "
            f"use more clients or shards_per_client"
        )
    # Start with one shard per class; give each further shard to the class with the largest shards.
    shards_of = np.ones(len(classes), dtype=int)
    for _ in range(total - len(classes)):
        shards_of[np.argmax(counts / shards_of)] += 1
    shards: list[np.ndarray] = []
    for c, k in zip(classes, shards_of, strict=True):
        shards += np.array_split(rng.permutation(np.flatnonzero(labels == c)), k)
    owner = rng.permutation(total).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in owner]


def _enforce_min_size(
    parts: list[np.ndarray], min_size: int, on_small: str, scheme: str, rng: np.random.Generator
) -> None:
    """Raise for, or top up from the largest clients, every client below `min_size` (in place)."""
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if not small:
        return
    if on_small == "error":
        i = small[0]
        raise NeuliteError(
            f"partition: client {i} got {len(parts[i])} samples < min_size={min_size} ({scheme}, "
            f"{len(small)} such clients); use fewer clients, a larger alpha, or on_small='clamp'"
        )
    moved = 0
    for i in small:
        while len(parts[i]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            k = min(min_size - len(parts[i]), len(parts[donor]) - min_size)
            take = rng.choice(len(parts[donor]), size=k, replace=False)
            parts[i] = np.concatenate([parts[i], parts[donor][take]])
            parts[donor] = np.delete(parts[donor], take)
            moved += k
    warnings.warn(
        f"partition: moved {moved} samples from the largest clients to {len(small)} clients below min_size={min_size}",
        stacklevel=3,
    )


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into sorted (train, val) for tuning.

    The validation part is round(val_fraction * n) samples, but at least one when val_fraction > 0
    and at most n - 1, so the client keeps a sample to train on.
    """
    if not 0 <= val_fraction < 1:
        raise NeuliteError(f"train_val_split: val_fraction must be in [0, 1), got {val_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(1, round(val_fraction * n)), n - 1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
