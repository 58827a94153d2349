"""Epoch samplers: P identities x K images per batch, and graph (k-NN class) batches.

Both samplers turn `labels` (one int per record) into an epoch array of record indices
`[num_batches, global_batch]` with `global_batch = p * k`, deterministic from `(seed, epoch)`. Inside a
batch the K images of one identity are contiguous, so batch position `j` holds identity slot `j // k`.

QAConv matching groups (`model.qaconv_group_size` = G images, a multiple of K dividing the batch) are the
G consecutive images of a batch: every group holds G/K whole identities. `PKSampler` batches are groups of
distinct identities as they are; `GraphSampler` makes each group one class neighbourhood (a seed class and
its G/K - 1 nearest classes), so the hard negatives QAConv needs are inside the group it is matched in.

Epoch length: `num_batches = num_records // global_batch` for both samplers, so an epoch is one pass's
worth of images and `pipeline.steps_per_epoch(num_records, global_batch)` is known before sampling.
`PKSampler` draws identities from a stream of concatenated shuffles of all identities, so each identity
appears equally often (within one) per epoch, at least once whenever `num_batches * p >= num_classes`;
`GraphSampler` visits seed classes in shuffled rounds (see its docstring).

Images of an identity are visited in a per-epoch random order, cyclically: the t-th time an identity
appears in an epoch it gets positions `[t*k, (t+1)*k)` of that order (mod its image count), so images are
not repeated until all of the identity's images were used. Identities with fewer than K images are
sampled with replacement.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_batch(labels: np.ndarray, p: int, k: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    if p < 1 or k < 1:
        raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
    if labels.size < p * k:
        raise ValueError(
            f"{labels.size} records are fewer than one global batch of p*k = {p}*{k} = {p * k} images")
    return labels.astype(np.int64)


def _classes_per_group(p: int, k: int, group_size: int) -> int:
    """Identities per matching group of `group_size` images (0 = the whole batch of p * k)."""
    if group_size == 0:
        return p
    if group_size < 0 or group_size % k or (p * k) % group_size:
        raise ValueError(f"group_size={group_size} (model.qaconv_group_size) must be 0 or a multiple of k={k} "
                         f"that divides the global batch p*k = {p * k}")
    return group_size // k


class _ImageCycler:
    """Per-epoch random order of each identity's records, read cyclically K at a time."""

    def __init__(self, labels: np.ndarray, k: int, rng: np.random.Generator):
        self.k = k
        # Sorting by (label, random key) shuffles the records inside every identity in one pass.
        self.order = np.lexsort((rng.random(labels.size), labels))
        num_labels = int(labels.max()) + 1
        self.counts = np.bincount(labels, minlength=num_labels)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rng = rng

    def take(self, slots: np.ndarray) -> np.ndarray:
        """Record indices for a stream of identity slots.

        Args:
          slots: int [S] identity of each slot, in epoch order.

        Returns:
          int64 [S * k] record indices, K contiguous per slot.
        """
        # The t-th appearance of an identity reads the t-th K-block of its cyclic order.
        by_id = np.argsort(slots, kind="stable")
        sorted_ids = slots[by_id]
        first = np.searchsorted(sorted_ids, sorted_ids, side="left")
        occurrence = np.empty_like(slots)
        occurrence[by_id] = np.arange(slots.size) - first
        counts = self.counts[slots][:, None]
        cyclic = occurrence[:, None] * self.k + np.arange(self.k)[None, :]
        drawn = self.rng.integers(0, np.iinfo(np.int64).max, size=cyclic.shape)
        position = np.where(counts >= self.k, cyclic, drawn) % counts
        return self.order[self.starts[slots][:, None] + position].reshape(-1)


def _identity_stream(classes: np.ndarray, p: int, num_slots: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Concatenated shuffles of `classes`, reordered at the seams so every P-block is distinct."""
    parts = []
    length = 0
    tail = np.empty(0, np.int64)
    while length < num_slots:
        perm = rng.permutation(classes)
        if tail.size:
            # The batch that straddles two shuffles must not repeat an identity from the previous one.
            fits = np.flatnonzero(~np.isin(perm, tail))[:p - tail.size]
            perm = np.concatenate([perm[fits], np.delete(perm, fits)])
        parts.append(perm)
        length += perm.size
        tail = np.concatenate([tail, perm])[-(length % p):] if length % p else np.empty(0, np.int64)
    return np.concatenate(parts)[:num_slots]


class PKSampler:
    """P distinct identities x K images per batch.

    `num_batches = len(labels) // (p * k)`; identities come from concatenated shuffles of all identities
    present in `labels` (each appears equally often, within one, per epoch). Every matching group of
    `group_size` consecutive images holds `group_size / k` whole, distinct identities.

    Attributes:
      num_batches: batches per epoch.
      global_batch: p * k.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, group_size: int = 0):
        self.labels = _check_batch(labels, p, k)
        _classes_per_group(p, k, group_size)
        self.classes = np.unique(self.labels)
        if self.classes.size < p:
            raise ValueError(f"PK sampling needs at least p={p} identities, labels hold {self.classes.size}")
        self.p, self.k, self.seed = p, k, seed
        self.global_batch = p * k
        self.num_batches = self.labels.size // self.global_batch

    def epoch(self, epoch: int) -> np.ndarray:
        """Record indices of one epoch.

        Args:
          epoch: epoch number; with `seed` it fixes the result.

        Returns:
          int64 [num_batches, p * k].
        """
        rng = np.random.default_rng([self.seed, epoch])
        cycler = _ImageCycler(self.labels, self.k, rng)
        slots = _identity_stream(self.classes, self.p, self.num_batches * self.p, rng)
        return cycler.take(slots).reshape(self.num_batches, self.global_batch)


@functools.partial(jax.jit, static_argnames="k")
def _chunk_top_k(rows: jax.Array, centres: jax.Array, offset: jax.Array, k: int) -> jax.Array:
    """Indices [chunk, k] of the most similar rows of `centres`, row `offset + i` (itself) excluded."""
    sims = jnp.matmul(rows, centres.T, precision=jax.lax.Precision.HIGHEST)
    own = offset + jnp.arange(rows.shape[0])
    sims = sims.at[jnp.arange(rows.shape[0]), own].set(-jnp.inf)
    return jax.lax.top_k(sims, k)[1]



def knn_classes(centres: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Nearest classes by cosine similarity of class centres, excluding the class itself.

    Computes `chunk` rows of the similarity matrix at a time (memory O(chunk * C), never [C, C]); rows
    are padded to `chunk` so one compilation serves every chunk.

    Args:
      centres: float [C, E] class centres (e.g. the AdaFace kernel transposed); need not be normalized.
      k: neighbours per class, 1 <= k < C.
      chunk: rows per matmul.

    Returns:
      int32 [C, k] neighbour class ids, most similar first.
    """
    centres = np.asarray(centres, np.float32)
    if centres.ndim != 2:
        raise ValueError(f"centres must be [C, E], got shape {centres.shape}")
    num_classes = centres.shape[0]
    if not 1 <= k < num_classes:
        raise ValueError(f"k must be in [1, {num_classes - 1}] for {num_classes} classes, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk} (data.graph_chunk)")
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError(f"class centres {np.flatnonzero(norms[:, 0] <= 0)[:10].tolist()} have zero norm")
    unit = jnp.asarray(centres / norms)
    chunk = min(chunk, num_classes)
    out = np.empty((num_classes, k), np.int32)
    for start in range(0, num_classes, chunk):
        rows = unit[start:start + chunk]
        valid = rows.shape[0]
        if valid < chunk:
            rows = jnp.pad(rows, ((0, chunk - valid), (0, 0)))
        top = _chunk_top_k(rows, unit, jnp.int32(start), k=k)
        out[start:start + valid] = np.asarray(top[:valid])
    return out


class GraphSampler:
    """Graph sampling (QAConv-GS style): each matching group is a seed class and its nearest classes.

    A group of `group_size` images (0 = the whole batch) holds `q = group_size / k` classes: a seed and its
    q-1 nearest classes, K images each; a batch holds `p / q` such groups, one after the other. Seeds are
    visited in a shuffled order; a class already placed in a group this epoch (as seed or as neighbour) is
    skipped as a seed, and once every class is used a new shuffled round starts. The neighbours themselves
    are kept even when already used, since their similarity to the seed is the point of the group (so a
    class may appear in two groups of one batch). Neighbour entries that are the seed itself, repeated, out
    of range or without records are skipped and further neighbours are used; if the row runs out, random
    classes unused this round (then any class) fill the group, so it always holds exactly q distinct
    classes. `num_batches = len(labels) // (p * k)`, as for `PKSampler`.

    Attributes:
      num_batches: batches per epoch.
      global_batch: p * k.
      classes_per_group: q, the classes of one neighbourhood; `epoch` needs q-1 neighbours per class.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, group_size: int = 0):
        self.labels = _check_batch(labels, p, k)
        self.classes_per_group = _classes_per_group(p, k, group_size)
        self.num_classes = int(self.labels.max()) + 1
        self.present = np.bincount(self.labels, minlength=self.num_classes) > 0
        if self.present.sum() < self.classes_per_group:
            raise ValueError(f"graph sampling needs at least {self.classes_per_group} identities per group, labels "
                             f"hold {self.present.sum()}")
        self.p, self.k, self.seed = p, k, seed
        self.global_batch = p * k
        self.num_batches = self.labels.size // self.global_batch

    def epoch(self, epoch: int, neighbours: np.ndarray) -> np.ndarray:
        """Record indices of one epoch.

        Args:
          epoch: epoch number; with `seed` it fixes the result.
          neighbours: int [C, >= q-1] nearest classes of each class, most similar first (`knn_classes`
            with k = classes_per_group - 1).

        Returns:
          int64 [num_batches, p * k].
        """
        q = self.classes_per_group
        neighbours = np.asarray(neighbours)
        if neighbours.ndim != 2 or neighbours.shape[0] < self.num_classes or neighbours.shape[1] < q - 1:
            raise ValueError(f"neighbours must be [C >= {self.num_classes}, >= classes per group - 1 = {q - 1}], "
                             f"got {neighbours.shape}")
        rng = np.random.default_rng([self.seed, epoch])
        cycler = _ImageCycler(self.labels, self.k, rng)
        classes = np.flatnonzero(self.present)
        used = np.zeros(self.num_classes, bool)
        seeds = rng.permutation(classes)
        cursor = 0
        slots = np.empty((self.num_batches * (self.p // q), q), np.int64)
        for group in range(slots.shape[0]):
            while cursor < seeds.size and used[seeds[cursor]]:
                cursor += 1
            if cursor == seeds.size:
                used[:] = False
                seeds = rng.permutation(classes)
                cursor = 0
            seed_class = seeds[cursor]
            slots[group] = self._group_classes(seed_class, neighbours[seed_class], used, rng)
            used[slots[group]] = True
        return cycler.take(slots.reshape(-1)).reshape(self.num_batches, self.global_batch)

    def _group_classes(self, seed_class: int, row: np.ndarray, used: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
        row = row[(row >= 0) & (row < self.num_classes)]
        row = row[self.present[row] & (row != seed_class)]
        _, first = np.unique(row, return_index=True)
        q = self.classes_per_group
        group = np.concatenate([[seed_class], row[np.sort(first)][:q - 1]]).astype(np.int64)
        if group.size < q:
            taken = np.zeros(self.num_classes, bool)
            taken[group] = True
            fill = np.flatnonzero(self.present & ~taken & ~used)
            if fill.size < q - group.size:
                fill = np.flatnonzero(self.present & ~taken)
            group = np.concatenate([group, rng.choice(fill, q - group.size, replace=False)])
        return group
