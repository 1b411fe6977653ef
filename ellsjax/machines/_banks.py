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

__all__ = ["bank_key", "GroupBank", "DeviceBank", "BlockIndex", "build_group_bank", "pack_group_bank", "pad_multiple", "unique_rows",
           "bank_nbytes", "block_order"]

def bank_key(scale: int | None, conditional: bool) -> str:
    """Key of a prebuilt bank in a bank machine's ``banks``."""
    return f"k{scale}" + ("/class" if conditional else "")


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


class BlockIndex(NamedTuple):
    """Bounds on the blocks of a bank whose entries were ordered by :func:`block_order`: consecutive
    runs of ``U/nb`` entries. Two lower bounds on ``‖q − a·k‖`` for every key ``k`` of a block hold
    (float64 on the host, stored loosened by a relative 1e-5):

    * a ball: ``‖k − center‖ ≤ radius``;
    * a box in the bank's principal subspace (orthonormal ``basis``, ``r`` rows): ``lo ≤ basis·k ≤ hi``,
      and the norm of the rest of ``k`` within ``[perp_lo, perp_hi]``.

    Attributes:
        centers: ``[Kb, G, nb, D]`` each block's mean key (padding excluded).
        radii: ``[Kb, G, nb]``.
        counts: ``[Kb, G, nb]`` the block's total multiplicity (0: only padding).
        key_norm: ``[Kb, G]`` the largest ``‖k‖`` of the bank (for the logits' rounding slack).
        basis: ``[Kb, G, r, D]`` the bank's top principal directions (the first one also orders
            queries into tiles of similar queries).
        lo, hi: ``[Kb, G, nb, r]`` the box.
        perp_lo, perp_hi: ``[Kb, G, nb]`` the range of ``‖k − basisᵀ·basis·k‖``.
    """

    centers: np.ndarray
    radii: np.ndarray
    counts: np.ndarray
    key_norm: np.ndarray
    basis: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    perp_lo: np.ndarray
    perp_hi: np.ndarray


class DeviceBank(NamedTuple):
    """A prebuilt bank as a machine stores it: the kernel's packed layout (see
    :class:`ellsjax.kernel.PackedBank`) over ``[Kb, G]`` banks, padded to a multiple of a power of two
    (per device slot for a sharded bank; see :func:`pack_group_bank` for where entries lie).

    Attributes:
        keys_t: ``[Kb, G, D+1, U]`` keys transposed, ``‖k‖²`` as the last row (1e30 for padding).
        vv: ``[Kb, G, U, 1+V]`` ``[c, c·v]``; ``c = 0`` for padding.
        values: ``[Kb, G, U, V]`` the values, or ``None`` where they are the keys themselves.
        blocks: a :class:`BlockIndex` when the entries are ordered in bounded blocks (for pruned
            streaming), else ``None``.
    """

    keys_t: np.ndarray
    vv: np.ndarray
    values: np.ndarray | None
    blocks: BlockIndex | None = None


def _principal_direction(x: np.ndarray, rng: np.random.Generator, iters: int = 12) -> np.ndarray:
    """Top principal direction of the rows of ``x`` (power iteration on a sample of at most 4096 rows)."""
    if len(x) > 4096:
        x = x[rng.choice(len(x), 4096, replace=False)]
    xc = (x - x.mean(0)).astype(np.float64)
    v = rng.standard_normal(x.shape[1])
    for _ in range(iters):
        v = xc.T @ (xc @ v)
        nv = np.linalg.norm(v)
        if nv == 0:
            break
        v /= nv
    nv = np.linalg.norm(v)
    return v / nv if nv > 0 else np.eye(x.shape[1])[0]


def block_order(keys: np.ndarray, block: int, seed: int = 0) -> np.ndarray:
    """A permutation of the rows of ``keys`` ``[n, D]`` under which every run of ``block`` rows is
    compact: recursive splits at a multiple of ``block`` near the median of the projection on the
    segment's principal direction (a PCA tree whose leaves are the blocks). Deterministic."""
    rng = np.random.default_rng(seed)
    order = np.arange(len(keys))
    segments = [(0, len(keys))]
    while segments:
        lo, hi = segments.pop()
        if hi - lo <= block:
            continue
        seg = keys[order[lo:hi]]
        proj = (seg - seg.mean(0)) @ _principal_direction(seg, rng)
        half = max(block, int(round((hi - lo) / (2 * block))) * block)
        if half >= hi - lo:
            half = hi - lo - block if hi - lo > block else hi - lo
        part = np.argpartition(proj, half - 1)
        order[lo:hi] = order[lo:hi][part]
        segments += [(lo, lo + half), (lo + half, hi)]
    return order


_BASIS_RANK = 16


def _block_index(keys: np.ndarray, present: np.ndarray, counts: np.ndarray, block: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The :class:`BlockIndex` fields of consecutive blocks of ``block`` rows (one bank)."""
    u, d = keys.shape
    nb = u // block
    kb = keys.reshape(nb, block, d).astype(np.float64)
    pb = present.reshape(nb, block)
    n_in = pb.sum(1)
    centers = np.where(n_in[:, None] > 0, (kb * pb[..., None]).sum(1) / np.maximum(n_in, 1)[:, None], 0.0)
    dist = np.sqrt(((kb - centers[:, None]) ** 2).sum(-1))
    radii = np.where(pb, dist, 0.0).max(1) * (1 + 1e-5) + 1e-6
    cnt = (counts.reshape(nb, block) * pb).sum(1)
    real = keys[present].astype(np.float64)
    norm = float(np.sqrt((real**2).sum(-1).max())) if len(real) else 0.0
    r = min(_BASIS_RANK, d)
    sample = real[rng.choice(len(real), min(len(real), 8192), replace=False)] if len(real) else np.zeros((1, d))
    _, _, vt = np.linalg.svd(sample - sample.mean(0), full_matrices=False)
    basis = np.zeros((r, d))
    basis[: min(r, vt.shape[0])] = vt[:r]
    proj = kb @ basis.T  # [nb, block, r]
    perp = np.sqrt(np.maximum((kb**2).sum(-1) - (proj**2).sum(-1), 0.0))
    inf = np.inf
    lo = np.where(pb[..., None], proj, inf).min(1)
    hi = np.where(pb[..., None], proj, -inf).max(1)
    plo = np.where(pb, perp, inf).min(1)
    phi = np.where(pb, perp, -inf).max(1)
    empty = n_in == 0
    lo[empty], hi[empty], plo[empty], phi[empty] = 0.0, 0.0, 0.0, 0.0
    slack = 1e-5 * (np.abs(proj).max() if proj.size else 0.0) + 1e-6
    return (centers, radii, cnt, norm, basis, lo - slack, hi + slack, np.maximum(plo * (1 - 1e-5) - 1e-6, 0.0),
            phi * (1 + 1e-5) + 1e-6)


def pad_multiple(u: int, devices: int = 1, cap: int = 4096) -> int:
    """The granularity banks of ``u`` entries are padded to: per device, a power of two
    ``≥ min(⌈u/devices⌉, cap)``; times ``devices``.

    :func:`pack_group_bank` gives every device a slot of a multiple of that power of two and spreads
    the real entries evenly over the slots, so each device streams ``⌈u/devices⌉`` or ``⌊u/devices⌋``
    real entries whatever ``u`` (a power of two ``≥ u`` per device would leave the slots of all
    devices but the first full of padding).

    Example:
        >>> pad_multiple(10), pad_multiple(10, 4), pad_multiple(10_000, 4)
        (16, 16, 16384)
    """
    per_device = -(-u // devices)
    p = 1
    while p < min(per_device, cap):
        p *= 2
    return p * devices


def pack_group_bank(gb: GroupBank, multiple: int, block: int | None = None, *, devices: int = 1) -> DeviceBank:
    """Host-side conversion of a :class:`GroupBank` to the packed, padded :class:`DeviceBank`.

    The entry axis is cut into ``devices`` equal slots (a multiple of ``multiple // devices`` each,
    see :func:`pad_multiple`), one per device of a sharded bank. Each bank's real entries are split
    into ``devices`` consecutive runs whose sizes differ by at most one, and run ``i`` fills the start
    of slot ``i`` (padding after it): every device holds its share of real entries, whatever the
    bank size. With one device this is the bank followed by its padding.

    With ``block`` (a power of two dividing the slot), each slot's entries are reordered by
    :func:`block_order` and a :class:`BlockIndex` is attached (same entries, same results; pruned
    streaming can then skip whole blocks). Blocks never straddle two slots.

    Example:
        >>> gb = build_group_bank(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), [np.arange(10)],
        ...                       np.zeros((1, 1, 1), np.int64), None)
        >>> db = pack_group_bank(gb, pad_multiple(10, 4), devices=4)
        >>> (db.vv[0, 0, :, 0].reshape(4, -1) > 0).sum(1)  # real entries per device slot
        array([3, 3, 2, 2])
    """
    kb, g, u, d = gb.keys.shape
    devices = int(devices)
    if devices < 1 or multiple % devices:
        raise ValueError(f"devices: expected a positive divisor of multiple={multiple}, got {devices}")
    per = multiple // devices
    longest_run = -(-u // devices)
    slot = -(-longest_run // per) * per  # entries per device: the longest run rounded up to `per`
    up = slot * devices
    if block is not None and slot % block:
        raise ValueError(f"block: {block} does not divide the padded bank size {slot} per device")
    present_in = np.isfinite(gb.log_count)
    # (a, b, start, entries): run `entries` of bank (a, b) goes to packed positions start, start+1, …
    runs = []
    for a in range(kb):
        for b in range(g):
            real = np.flatnonzero(present_in[a, b])
            for i, run in enumerate(np.array_split(real, devices)):
                if block is not None and len(run):
                    run = run[block_order(gb.keys[a, b, run], block)]
                elif len(run) and run[-1] - run[0] == len(run) - 1:
                    run = slice(int(run[0]), int(run[-1]) + 1)  # contiguous: a copy, not a gather
                runs.append((a, b, i * slot, run))

    def gather(x, fill=0.0):
        out = np.full((kb, g, up, *x.shape[3:]), fill, np.float32)
        for a, b, start, run in runs:
            src = x[a, b, run]
            out[a, b, start : start + len(src)] = src
        return out

    keys = gather(gb.keys)
    values = gather(gb.keys if gb.values is None else gb.values)
    log_count = gather(gb.log_count, -np.inf)
    present = np.isfinite(log_count)
    counts = np.where(present, np.exp(np.where(present, log_count, 0.0)), 0.0).astype(np.float32)
    blocks = None
    if block is not None:
        rng = np.random.default_rng(0)
        idx = {name: [] for name in BlockIndex._fields}
        for a in range(kb):
            for b in range(g):
                for name, v in zip(BlockIndex._fields, _block_index(keys[a, b], present[a, b], counts[a, b],
                                                                    block, rng), strict=True):
                    idx[name].append(v)
        blocks = BlockIndex(*(np.asarray(idx[n], np.float32).reshape(kb, g, *np.shape(idx[n][0]))
                              for n in BlockIndex._fields))
    keys_t = np.empty((kb, g, d + 1, up), np.float32)
    keys_t[:, :, :d] = np.swapaxes(keys, -1, -2)
    keys_t[:, :, d] = np.where(present, np.einsum("...d,...d->...", keys, keys), 1e30)
    vv = np.concatenate([counts[..., None], counts[..., None] * values], axis=-1).astype(np.float32)
    vals = None if gb.values is None else values
    return DeviceBank(keys_t, vv, vals, blocks)
