"""Client partitions of the training split: IID, Dirichlet label skew, label shards.

Every random choice takes an explicit seed, so a run's partition follows from its config.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hfedmoe.platform.errors import ConfigError

PARTITION_KINDS = ("iid", "dirichlet", "shards")
_RESAMPLE_HINT = "or set data.partition.samples_per_client to sample clients with replacement"


class ClientShards:
    """Client datasets in CSR layout: client c holds `indices[offsets[c]:offsets[c + 1]]`.

    Two flat arrays rather than one array per client keep 100,000 clients cheap to build,
    pickle and ship to workers.
    """

    def __init__(self, indices: np.ndarray, offsets: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or len(self.offsets) == 0
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.indices)
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise ValueError("offsets must start at 0, never decrease and end at len(indices)")

    @classmethod
    def from_lists(cls, shards: Sequence[np.ndarray]) -> ClientShards:
        """Pack one index array per client."""
        sizes = [len(shard) for shard in shards]
        # The empty leading array keeps np.concatenate valid for zero clients.
        indices = np.concatenate([np.empty(0, dtype=np.int64), *shards])
        return cls(indices, _offsets(np.array(sizes, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client: int) -> np.ndarray:
        """Client `client`'s indices, as a view; negative indices count from the end."""
        client = range(len(self))[client]
        return self.indices[self.offsets[client] : self.offsets[client + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def label_histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Samples per (client, class), shape [num_clients, num_classes]."""
        owner = np.repeat(np.arange(len(self)), self.sizes)
        cells = owner * num_classes + np.asarray(labels)[self.indices]
        return np.bincount(cells, minlength=len(self) * num_classes).reshape(-1, num_classes)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)


def _group_by_client(owners: np.ndarray, members: np.ndarray, num_clients: int) -> ClientShards:
    """CSR shards from parallel arrays (owning client, pool position) in any order."""
    order = np.argsort(owners, kind="stable")
    return ClientShards(members[order], _offsets(np.bincount(owners, minlength=num_clients)))


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")


def _min_client_size(min_size: int, allow_empty: bool) -> int:
    return min_size if allow_empty else max(min_size, 1)


def partition_iid(num_samples: int, num_clients: int, seed: int, min_size: int = 1) -> ClientShards:
    """Shuffle the pool and deal it out as evenly as possible (sizes differ by at most one)."""
    _check_clients(num_clients)
    base, extra = divmod(num_samples, num_clients)
    if base < min_size:
        raise ConfigError(
            f"{num_samples} training samples over {num_clients} clients leave some with {base}, "
            f"fewer than min_size={min_size}; lower data.partition.min_size, use fewer clients "
            "(federation.num_clients), " + _RESAMPLE_HINT
        )
    sizes = np.full(num_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    return ClientShards(np.random.default_rng(seed).permutation(num_samples), _offsets(sizes))


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    allow_empty: bool = False,
    max_retries: int = 100,
) -> ClientShards:
    """Label-skewed split: each class is divided over clients in Dir(alpha) proportions.

    Draws are repeated from the same generator until every client has at least `min_size`
    samples (at least 1 unless `allow_empty`), as in Hsu et al. 2019.
    """
    _check_clients(num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    required = _min_client_size(min_size, allow_empty)
    hint = (
        "lower data.partition.min_size, raise data.partition.alpha, use fewer clients "
        "(federation.num_clients), " + _RESAMPLE_HINT
    )
    if num_clients * required > len(labels):
        raise ConfigError(
            f"{num_clients} clients with at least {required} samples each need "
            f"{num_clients * required} samples, but the training split has {len(labels)}; {hint}"
        )
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(labels == cls) for cls in np.unique(labels)]
    for _ in range(max_retries):
        shards = _dirichlet_draw(pools, num_clients, alpha, rng)
        if shards.sizes.min() >= required:
            return shards
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) draw in {max_retries} tries gave all {num_clients} "
        f"clients at least {required} samples from a pool of {len(labels)}; {hint}"
    )


def _dirichlet_draw(
    pools: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> ClientShards:
    """One draw: each class pool, shuffled, is divided over clients in Dir(alpha) shares."""
    owners, members = [], []
    for pool in pools:
        counts = rng.multinomial(len(pool), rng.dirichlet(np.full(num_clients, alpha)))
        owners.append(np.repeat(np.arange(num_clients), counts))
        members.append(rng.permutation(pool))
    return _group_by_client(np.concatenate(owners), np.concatenate(members), num_clients)


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> ClientShards:
    """Pathological non-IID split (McMahan et al. 2017): label-sorted shards dealt at random.

    Shard sizes differ by at most one so every sample is dealt; a shard straddling a class
    boundary gives its client one extra label.
    """
    _check_clients(num_clients)
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    if shards_per_client < 1 or len(labels) < num_shards:
        raise ConfigError(
            f"{num_clients} clients x {shards_per_client} shards need at least {num_shards} "
            f"samples, but the training split has {len(labels)}; use fewer clients "
            "(federation.num_clients) or a smaller "
            "data.partition.shards_per_client"
        )
    rng = np.random.default_rng(seed)
    # Shuffling before the stable sort makes each shard a random draw within its label.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    bounds = np.arange(num_shards + 1) * len(labels) // num_shards
    shard_of_position = np.repeat(np.arange(num_shards), np.diff(bounds))
    owner_of_shard = np.empty(num_shards, dtype=np.int64)
    owner_of_shard[rng.permutation(num_shards)] = np.repeat(
        np.arange(num_clients), shards_per_client
    )
    return _group_by_client(owner_of_shard[shard_of_position], by_label, num_clients)


def partition_resampled(
    labels: np.ndarray,
    num_clients: int,
    samples_per_client: int,
    alpha: float | None,
    seed: int,
) -> ClientShards:
    """`samples_per_client` positions per client, drawn with replacement (any number of clients).

    Each client draws its own label mix from Dir(alpha) over the classes present, then samples
    uniformly within each label. `alpha=None` samples uniformly from the whole pool instead.
    """
    _check_clients(num_clients)
    labels = np.asarray(labels)
    if samples_per_client < 1 or len(labels) == 0:
        raise ValueError("partition_resampled needs samples_per_client >= 1 and a non-empty pool")
    rng = np.random.default_rng(seed)
    if alpha is None:
        indices = rng.integers(0, len(labels), size=num_clients * samples_per_client)
        return ClientShards(indices, np.arange(num_clients + 1) * samples_per_client)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    pools = [np.flatnonzero(labels == cls) for cls in np.unique(labels)]
    mix = rng.dirichlet(np.full(len(pools), alpha), size=num_clients)
    counts = rng.multinomial(samples_per_client, mix)
    owners = [np.repeat(np.arange(num_clients), counts[:, c]) for c in range(len(pools))]
    members = [
        pool[rng.integers(0, len(pool), size=counts[:, c].sum())] for c, pool in enumerate(pools)
    ]
    return _group_by_client(np.concatenate(owners), np.concatenate(members), num_clients)


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
    allow_empty: bool = False,
    samples_per_client: int | None = None,
    seed: int,
) -> ClientShards:
    """Split a pool as `data.partition` says; positions index into `labels`.

    With `samples_per_client`, clients are sampled with replacement: uniformly for "iid",
    with per-client Dir(alpha) label mixes for "dirichlet". `min_size`/`allow_empty` apply to
    the iid and dirichlet splits; shards always gives each client `shards_per_client` shards.
    """
    if kind not in PARTITION_KINDS:
        raise ValueError(f"unknown partition kind {kind!r}; allowed: {', '.join(PARTITION_KINDS)}")
    if samples_per_client is not None:
        if kind == "shards":
            raise ValueError(
                "data.partition.samples_per_client works with kind 'iid' or 'dirichlet', "
                "not 'shards'"
            )
        mix_alpha = None if kind == "iid" else alpha
        return partition_resampled(labels, num_clients, samples_per_client, mix_alpha, seed)
    if kind == "iid":
        return partition_iid(
            len(labels), num_clients, seed, _min_client_size(min_size, allow_empty)
        )
    if kind == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed, min_size, allow_empty)
    return partition_shards(labels, num_clients, shards_per_client, seed)
