"""Materialized, deduplicated patch banks, built once per scale on the host.

A machine's bank for one group of pixels is the set of training windows at the group's bank
positions. Building it once per scale (instead of gathering windows from the images at every step)
lets the kernel stream it in chunks of any size, and lets identical windows — MNIST-like data is full
of them: 59% of the 3×3 windows of resized MNIST are pure background — be stored once with their
multiplicity, entered into the softmax as a log-count (exact: ``c·exp(l) = exp(l + log c)``).

Layout of a :class:`GroupBank`: ``[Kb, G, U, ·]`` with ``Kb`` banks (1 for the whole training set, or
one per class), ``G`` sub-groups of pixels, ``U`` entries (padded with ``log_count = -inf``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["GroupBank", "build_group_bank", "unique_rows", "bank_nbytes"]

# Images gathered per host step while building (bounds the host memory of the build).
_BUILD_ENTRIES = 2_000_000


class GroupBank(NamedTuple):
    """A materialized bank of one position group (numpy on the host, jax arrays in a machine).

    Attributes:
        keys: ``[Kb, G, U, D]`` distinct windows.
        values: ``[Kb, G, U, C]`` their center pixels, or ``None`` where the value is the key itself.
        log_count: ``[Kb, G, U]`` log multiplicity; ``-inf`` marks padding.
        sq_norm: ``[Kb, G, U]`` ``‖key‖²``.
    """

    keys: np.ndarray
    values: np.ndarray | None
    log_count: np.ndarray
    sq_norm: np.ndarray


def unique_rows(rows: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a float32 ``[n, D]`` array (bitwise equality) and their total counts."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.shape[0] == 0:
        return rows, np.zeros(0, np.int64)
    view = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    weights = np.ones(len(rows), np.int64) if counts is None else counts
    return rows[first], np.bincount(inverse.ravel(), weights=weights, minlength=len(first)).astype(np.int64)


def bank_nbytes(n_images: int, bidx: np.ndarray, channels: int, with_values: bool) -> int:
    """Upper bound (no duplicates) of the bytes of a bank built from ``n_images`` images."""
    g, pb, kk = bidx.shape
    per_entry = kk * channels + (channels if with_values else 0) + 2
    return 4 * n_images * g * pb * per_entry


def build_group_bank(
    images: np.ndarray, members: list[np.ndarray], bidx: np.ndarray, center: int | None
) -> GroupBank:
    """Build the deduplicated bank of one position group.

    Args:
        images: ``[N, H, W, C]`` float32 training images (host).
        members: one index array per bank (``[arange(N)]``, or one per class).
        bidx: ``[G, Pb, kk]`` flat window index (into ``H·W + 1``, the last slot a zero pixel) of each
            bank position of each sub-group.
        center: index within the window of the value pixel, or ``None`` for values = keys.
    """
    n, h, w, c = images.shape
    flat = np.concatenate([images.reshape(n, h * w, c), np.zeros((n, 1, c), images.dtype)], axis=1)
    g, pb, kk = bidx.shape
    per_image = max(1, pb * kk * c)
    step = max(1, _BUILD_ENTRIES // per_image)
    banks: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for idx in members:
        per_group = []
        for gi in range(g):
            keys = np.zeros((0, kk * c), np.float32)
            counts = np.zeros(0, np.int64)
            for lo in range(0, len(idx), step):
                win = flat[idx[lo : lo + step]][:, bidx[gi]].reshape(-1, kk * c)
                keys, counts = unique_rows(np.concatenate([keys, win]), np.concatenate([counts, np.ones(len(win), np.int64)]))
            per_group.append((keys, counts))
        banks.append(per_group)
    u = max(1, max(len(k) for per_group in banks for k, _ in per_group))
    kb = len(banks)
    out_keys = np.zeros((kb, g, u, kk * c), np.float32)
    out_lc = np.full((kb, g, u), -np.inf, np.float32)
    for bi, per_group in enumerate(banks):
        for gi, (keys, counts) in enumerate(per_group):
            out_keys[bi, gi, : len(keys)] = keys
            out_lc[bi, gi, : len(keys)] = np.log(counts)
    values = None
    if center is not None:
        values = np.ascontiguousarray(out_keys[..., center * c : (center + 1) * c])
    return GroupBank(out_keys, values, out_lc, np.einsum("...d,...d->...", out_keys, out_keys))
