"""Split a training pool across nodes: IID, non-IID by a Dirichlet prior over labels, or natural.

A natural split keeps each owner's examples together (an owner is a hospital, a source, a package
of the Python standard library): owners are dealt to nodes largest first, each to the node with the
fewest examples so far, so every node holds whole owners and the sizes stay close.

Dirichlet(alpha) label skew follows Hsu et al., arXiv:1909.06335: for every class, draw the share
each node gets from Dir(alpha * 1); small alpha gives each node few classes. Both splits are a pure
function of their arguments (seeded numpy Generator).

A pool too small to give every node its own examples (1,000 simulated nodes over 1,437 digits) is dealt
out shared (`split`): each node gets `SHARED_SIZE` distinct examples, IID or with its own Dirichlet(alpha)
label mix, and an example may sit at several nodes. A natural split is never shared: it fails when
there are fewer owners than nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VAL_FRACTION = 0.2
"""Share of a node's partition held back as its local validation split."""
MIN_DISJOINT = 2
"""Fewest examples per node of a disjoint IID split (one to train on, one to validate on)."""
DIRICHLET_MIN_SIZE = 10
"""Fewest examples per node of a disjoint Dirichlet split."""
SHARED_SIZE = 10
"""Examples per node of a shared split (a pool too small for a disjoint one)."""


def split(
    kind: str,
    parts: int,
    seed: int,
    *,
    n: int,
    labels: np.ndarray | None = None,
    alpha: float | None = None,
    owners: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], bool]:
    """(one index array per node, whether the split is shared) for partition `kind` (iid, dirichlet, natural).

    IID and Dirichlet splits are disjoint when the pool allows it, and shared (`shared_iid_partition`,
    `shared_dirichlet_partition`) otherwise; a natural split raises `ValueError` when it cannot be made.
    """  # fmt: skip
    if kind == "natural":
        if owners is None:
            raise ValueError("the task declares no owner key")
        return natural_partition(owners, parts), False
    if kind == "iid":
        if n >= MIN_DISJOINT * parts:
            return iid_partition(n, parts, seed), False
        return shared_iid_partition(n, parts, seed), True
    if labels is None:
        raise ValueError("the task declares no class labels")
    alpha = alpha or 0.5
    if len(labels) >= DIRICHLET_MIN_SIZE * parts:
        try:
            return dirichlet_partition(labels, parts, alpha, seed, min_size=DIRICHLET_MIN_SIZE), False
        except ValueError as exc:
            if not str(exc).startswith("no Dirichlet"):
                raise
    return shared_dirichlet_partition(labels, parts, alpha, seed), True


def shared_iid_partition(n: int, parts: int, seed: int, size: int = SHARED_SIZE) -> list[np.ndarray]:
    """`min(size, n)` distinct examples per node, dealt round-robin from one seeded shuffle (examples repeat
    across nodes only once the pool runs out)."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if n < MIN_DISJOINT:
        raise ValueError(f"{n} example(s) cannot give a node one example to train on and one to validate on")
    size = min(size, n)
    order = np.random.default_rng(seed).permutation(n)
    starts = np.arange(parts, dtype=np.int64)[:, None] * size + np.arange(size, dtype=np.int64)[None, :]
    return [np.sort(order[row % n]) for row in starts]


def shared_dirichlet_partition(
    labels: np.ndarray, parts: int, alpha: float, seed: int, size: int = SHARED_SIZE
) -> list[np.ndarray]:
    """`size` examples per node whose label mix is the node's own Dirichlet(alpha) draw over the classes.

    Each class's examples are shuffled once and dealt round-robin, so examples repeat across nodes only
    when a class runs out; within a node they are distinct.
    """
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(labels) < MIN_DISJOINT:
        raise ValueError(f"{len(labels)} example(s) cannot give a node one to train on and one to validate on")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    cursor = np.zeros(len(classes), dtype=np.int64)
    size = min(size, len(labels))
    out = []
    for _ in range(parts):
        counts = rng.multinomial(size, rng.dirichlet(np.full(len(classes), alpha)))
        counts = np.minimum(counts, [len(q) for q in queues])
        while counts.sum() < size:  # a class smaller than its draw: top up from the largest remaining room
            room = np.array([len(q) for q in queues]) - counts
            counts[int(np.argmax(room))] += 1
        picked = []
        for c, count in enumerate(counts):
            if count:
                queue = queues[c]
                picked.append(queue[(cursor[c] + np.arange(count)) % len(queue)])
                cursor[c] += count
        out.append(np.sort(np.concatenate(picked)).astype(np.int64))
    return out


def partition(labels: np.ndarray, parts: int, alpha: float | None, seed: int) -> list[np.ndarray]:
    """IID when `alpha` is None, else Dirichlet(alpha) label skew: one index array per node."""
    if alpha is None:
        return iid_partition(len(labels), parts, seed)
    return dirichlet_partition(labels, parts, alpha, seed)


def natural_partition(owners: Sequence[str], parts: int) -> list[np.ndarray]:
    """Whole owners per node, balanced greedily by size (deterministic; no seed needed)."""
    _check(len(owners), parts)
    keys = np.asarray(owners, dtype=object)
    names, counts = np.unique(keys, return_counts=True)
    if len(names) < parts:
        raise ValueError(f"the data has {len(names)} owner(s); a natural split needs at least one per node ({parts})")
    order = sorted(range(len(names)), key=lambda i: (-int(counts[i]), str(names[i])))
    loads = [0] * parts
    assigned: list[list[str]] = [[] for _ in range(parts)]
    for i in order:
        node = min(range(parts), key=lambda k: (loads[k], k))
        assigned[node].append(str(names[i]))
        loads[node] += int(counts[i])
    return [np.flatnonzero(np.isin(keys, np.asarray(group, dtype=object))) for group in assigned]


def owners_of(owners: Sequence[str], parts: int) -> list[list[str]]:
    """Which owners each node gets under `natural_partition` (for the record)."""
    keys = np.asarray(owners, dtype=object)
    return [sorted({str(k) for k in keys[idx]}) for idx in natural_partition(owners, parts)]


def train_val_split(n: int, seed: int, node: int) -> tuple[np.ndarray, np.ndarray]:
    """A node's seeded local split of its `n` examples: (train positions, validation positions)."""
    order = np.random.default_rng([seed, node]).permutation(n)
    n_val = max(1, int(VAL_FRACTION * n))
    return order[n_val:], order[:n_val]


def iid_partition(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle of range(n) cut into `parts` nearly equal pieces."""
    _check(n, parts)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(order, parts)]


def dirichlet_partition(
    labels: np.ndarray, parts: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split; redraws (bounded) until every node has at least `min_size` examples."""
    _check(len(labels), parts)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if parts * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {parts} nodes {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        buckets: list[list[int]] = [[] for _ in range(parts)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for bucket, piece in zip(buckets, np.split(idx, cuts), strict=True):
                bucket.extend(piece.tolist())
        if min(len(b) for b in buckets) >= min_size:
            return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave all {parts} nodes >= {min_size} examples "
        f"in {max_tries} draws; raise alpha or use fewer nodes"
    )


def _check(n: int, parts: int) -> None:
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if n < parts:
        raise ValueError(f"{n} examples cannot be split across {parts} nodes")
