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

__all__ = ["GroupBank", "DeviceBank", "build_group_bank", "pack_group_bank", "pad_multiple", "unique_rows", "bank_nbytes"]

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
    """Distinct rows of a float32 ``[n, D]`` array (bitwise equality) and their total counts.

    Rows are grouped by a 64-bit multiplicative hash of their bits (a sort of ``n`` integers instead
    of ``n`` byte strings); every group is then checked for equality, and a collision, should one
    ever occur, falls back to sorting the raw rows. Exact either way.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    weights = np.ones(len(rows), np.int64) if counts is None else np.asarray(counts, np.int64)
    if rows.shape[0] == 0:
        return rows, np.zeros(0, np.int64)
    hashes = _row_hashes(rows)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if not _rows_match(rows, first, inverse):  # a hash collision: group the raw bytes instead
        view = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
        _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
    return rows[first], np.bincount(inverse, weights=weights, minlength=len(first)).astype(np.int64)


_HASH_BLOCK = 1 << 16


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    bits = rows.view(np.uint32)
    mult = np.random.default_rng(0x5EED).integers(1, 2**62, size=bits.shape[1], dtype=np.uint64) * 2 + 1
    out = np.empty(len(rows), np.uint64)
    for lo in range(0, len(rows), _HASH_BLOCK):  # bounded temporaries; uint64 arithmetic wraps mod 2^64
        blk = bits[lo : lo + _HASH_BLOCK].astype(np.uint64)
        blk ^= blk >> np.uint64(7)
        out[lo : lo + _HASH_BLOCK] = (blk * mult).sum(axis=1, dtype=np.uint64)
    return out


def _rows_match(rows: np.ndarray, first: np.ndarray, inverse: np.ndarray) -> bool:
    bits = rows.view(np.uint32)
    for lo in range(0, len(rows), _HASH_BLOCK):
        rep = first[inverse[lo : lo + _HASH_BLOCK]]
        if not np.array_equal(bits[lo : lo + _HASH_BLOCK], bits[rep]):
            return False
    return True


# Deduplicate only where a sample of the windows shows at least this many repeats per distinct window
# (MNIST 32x32: 2.6 at k=3, 1.7 at k=5, 1.04 at k=11, 1.00 at k=15); elsewhere hashing costs time
# and saves nothing. Either choice is exact.
_MIN_DEDUP_RATIO = 1.05
_SAMPLE_ROWS = 50_000


def _worth_deduplicating(rows: np.ndarray, n_images: int) -> bool:
    if len(rows) <= _SAMPLE_ROWS:
        return True
    sample = rows[:: max(1, len(rows) // _SAMPLE_ROWS)]
    return len(sample) / len(unique_rows(sample)[0]) >= _MIN_DEDUP_RATIO


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
    banks: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for idx in members:
        # the caller checked that all windows fit the bank budget: gather them, deduplicate once
        imgs = flat[idx]
        per_group = []
        for gi in range(g):
            rows = np.take(imgs, bidx[gi], axis=1).reshape(-1, kk * c)  # contiguous, unlike imgs[:, idx]
            if _worth_deduplicating(rows, len(idx)):
                per_group.append(unique_rows(rows))
            else:
                per_group.append((rows, np.ones(len(rows), np.int64)))
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


class DeviceBank(NamedTuple):
    """A prebuilt bank as a machine stores it: the kernel's packed layout (see
    :class:`ellsjax.kernel.PackedBank`) over ``[Kb, G]`` banks, padded to a multiple of a power of two.

    Attributes:
        keys_t: ``[Kb, G, D+1, U]`` keys transposed, ``‖k‖²`` as the last row (1e30 for padding).
        vv: ``[Kb, G, U, 1+V]`` ``[c, c·v]``; ``c = 0`` for padding.
        values: ``[Kb, G, U, V]`` the values, or ``None`` where they are the keys themselves.
    """

    keys_t: np.ndarray
    vv: np.ndarray
    values: np.ndarray | None


def pad_multiple(u: int, devices: int = 1, cap: int = 4096) -> int:
    """The granularity banks are padded to: a power of two ``≥ min(u, cap)``, times ``devices``."""
    p = 1
    while p < min(u, cap):
        p *= 2
    return p * devices


def pack_group_bank(gb: GroupBank, multiple: int) -> DeviceBank:
    """Host-side conversion of a :class:`GroupBank` to the packed, padded :class:`DeviceBank`."""
    kb, g, u, d = gb.keys.shape
    up = -(-u // multiple) * multiple
    keys_t = np.zeros((kb, g, d + 1, up), np.float32)
    keys_t[:, :, :d, :u] = np.swapaxes(gb.keys, -1, -2)
    present = np.isfinite(gb.log_count)
    keys_t[:, :, d, :] = 1e30
    keys_t[:, :, d, :u] = np.where(present, gb.sq_norm, 1e30)
    counts = np.where(present, np.exp(np.where(present, gb.log_count, 0.0)), 0.0).astype(np.float32)
    values = gb.keys if gb.values is None else gb.values
    vv = np.zeros((kb, g, up, 1 + values.shape[-1]), np.float32)
    vv[:, :, :u, 0] = counts
    vv[:, :, :u, 1:] = counts[..., None] * values
    vals = None
    if gb.values is not None:
        vals = np.zeros((kb, g, up, gb.values.shape[-1]), np.float32)
        vals[:, :, :u] = gb.values
    return DeviceBank(keys_t, vv, vals)
