r"""Patch machines: the local score (LS), the equivariant local score (ELS) and boundary-broken ELS.

All three answer, for every pixel ``p`` of ``x_t``, the same question with a different bank
(Kamb & Ganguli, arXiv 2412.20292, §3–4): with ``Ω_p`` the ``k×k`` window at ``p``,

.. math::

    \hat x_0(p) = \sum_j \mathrm{softmax}_j\Big(-\frac{\|x_t[\Omega_p] - a\,\phi_j\|^2}{2 s^2}\Big)\, \phi_j^{\mathrm{center}},

where the bank ``{φ_j}`` is

* **LS** (``local``): the windows at the same ``p`` of every training image, zero padded;
* **ELS** (``els``, ``padding="circular"``): every ``k×k`` patch lying fully inside any training
  image, at any position; ``x_t``'s window wraps circularly. Translation equivariant;
* **bbELS** (``els``, ``padding="zeros"``): ``x_t`` zero padded. A pixel whose window lies inside the
  image uses the ELS bank; a pixel within ``k//2`` of a border only meets zero-padded training
  windows whose centers have the same offsets from the borders (corner pixels: the same corner
  position; edge pixels: the same row (column) offset, any interior column (row)).

Implementation: pixels are split into *position groups* that share a bank (one group for ELS, one
per pixel for LS, interior/rows/columns/corners for bbELS). Static index tables gather the query
windows and the bank windows of each chunk of training images, and one pass of
:func:`ellsjax.kernel.streaming_softmax` serves all groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import presets as _presets
from ellsjax import schedules as _schedules
from ellsjax.machines import _registry
from ellsjax.machines._policy import query_tile
from ellsjax.machines.base import BankMachine, PixelProvenance, TrainingImages, bank_key, build, register

__all__ = ["LocalScore", "EquivariantLocalScore", "local", "els", "bbels"]


class _Group(NamedTuple):
    """A set of pixels sharing one bank. ``G`` sub-groups of equal size, stacked.

    qidx: ``[G, Pq, kk]`` flat window index (into ``H·W + 1``, the last slot a zero) of each query pixel.
    qpos: ``[G, Pq]`` flat position of each query pixel (where its output goes).
    bidx: ``[G, Pb, kk]`` flat window index of each bank position.
    bpos: ``[G, Pb]`` flat position of each bank window's center (its value).
    center: index of the center pixel within a window (row-major ``kh×kw``).
    """

    qidx: np.ndarray
    qpos: np.ndarray
    bidx: np.ndarray
    bpos: np.ndarray
    center: int


def _window_index(h: int, w: int, kh: int, kw: int, mode: str) -> np.ndarray:
    """``[H·W, kh·kw]`` flat index of the window centered at each pixel, rows then columns.

    ``mode="circular"`` wraps; ``mode="zeros"`` points outside pixels at slot ``H·W`` (a zero).
    """
    r = np.arange(h)[:, None, None, None] + np.arange(kh)[None, None, :, None] - kh // 2
    c = np.arange(w)[None, :, None, None] + np.arange(kw)[None, None, None, :] - kw // 2
    r, c = np.broadcast_arrays(r, c)
    if mode == "circular":
        idx = (r % h) * w + (c % w)
    else:
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        idx = np.where(inside, r * w + c, h * w)
    return idx.reshape(h * w, kh * kw).astype(np.int32)


def _flat(rows, cols, w) -> np.ndarray:
    return (np.asarray(rows)[:, None] * w + np.asarray(cols)[None, :]).ravel()


def _group(pos: np.ndarray, qwin: np.ndarray, bwin: np.ndarray, k: tuple[int, int], bpos: np.ndarray | None = None) -> _Group:
    """Group whose query pixels are ``pos`` ``[G, P]`` and whose bank centers are ``bpos`` (default
    ``pos``), for ``k = (kh, kw)`` windows."""
    bpos = pos if bpos is None else bpos
    return _Group(qwin[pos], pos, bwin[bpos], bpos, (k[0] // 2) * k[1] + k[1] // 2)


@functools.lru_cache(maxsize=256)
def _layout(kind: str, h: int, w: int, k: int) -> dict[str, _Group]:
    """Position groups for ``H×W`` images and scale ``k`` of the local score (``kind="local"``) or the
    ELS machine with ``kind`` its padding (``"circular"``: ELS, ``"zeros"``: bbELS)."""
    if kind == "local" or (kind == "zeros" and k >= min(h, w)):
        # Windows wider than 2·size−1 see only zeros beyond the image: clip them (exact).
        kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
        win = _window_index(h, w, kh, kw, "zeros")
        return {"pixels": _group(np.arange(h * w)[:, None], win, win, (kh, kw))}
    hk = k // 2
    zwin = _window_index(h, w, k, k, "zeros")
    interior = _flat(np.arange(hk, h - hk), np.arange(hk, w - hk), w)[None]
    if kind == "circular":
        cwin = _window_index(h, w, k, k, "circular")
        return {"all": _group(np.arange(h * w)[None], cwin, zwin, (k, k), interior)}
    groups = {"interior": _group(interior, zwin, zwin, (k, k))}
    if hk > 0:
        brow = np.r_[0:hk, h - hk : h]
        bcol = np.r_[0:hk, w - hk : w]
        groups["rows"] = _group(np.stack([_flat([r], np.arange(hk, w - hk), w) for r in brow]), zwin, zwin, (k, k))
        groups["cols"] = _group(np.stack([_flat(np.arange(hk, h - hk), [c], w) for c in bcol]), zwin, zwin, (k, k))
        groups["corners"] = _group(_flat(brow, bcol, w)[:, None], zwin, zwin, (k, k))
    return groups


class _Layout(NamedTuple):
    groups: dict[str, _Group]
    inverse: np.ndarray  # output order: concatenated group outputs -> pixel order


@functools.lru_cache(maxsize=256)
def _full_layout(kind: str, h: int, w: int, k: int) -> _Layout:
    groups = _layout(kind, h, w, k)
    order = np.concatenate([g.qpos.ravel() for g in groups.values()])
    if not np.array_equal(np.sort(order), np.arange(h * w)):  # every pixel answered exactly once
        raise AssertionError(f"internal: layout {kind} {h}x{w} k={k} does not cover the image")
    return _Layout(groups, np.argsort(order))


@dataclasses.dataclass(frozen=True, eq=False)
class _PatchMachine(BankMachine):
    """Common code of the patch machines (see module docstring)."""

    scale_kind: ClassVar[str] = "size"
    supports_provenance: ClassVar[bool] = True

    def _kind(self) -> str:
        """The layout (:func:`_layout`): ``"local"``, or the ELS padding."""
        return self.padding

    def _bank_layout(self, scale):
        h, w, _ = self.image_shape
        return {name: (g.bidx, g.center) for name, g in _full_layout(self._kind(), h, w, scale).groups.items()}

    def _queries(self, x_t, t, label, scale):
        """Per position group: the query windows of ``x_t`` (see :class:`_Group`)."""
        b, h, w, ch = x_t.shape
        layout = _full_layout(self._kind(), h, w, scale)
        ab, var = self.schedule.variances(t)
        a, inv_temp = jnp.sqrt(ab), 0.5 / var  # inv_temp = +inf at s = 0: nearest-patch limit
        xz = _with_zero_slot(x_t)  # [B, HW+1, C]
        queries = {}
        for name, g in layout.groups.items():
            ng, pq, kk = g.qidx.shape
            d = kk * ch
            q = xz[:, g.qidx].reshape(b, ng, pq, d)
            if label is not None:  # every image its own bank: leading dims (B, G)
                qa = jnp.broadcast_to(a[:, None, None], (b, ng, pq))
                qt = jnp.broadcast_to(inv_temp[:, None, None], (b, ng, pq))
            else:  # one bank for the batch: leading dim (G,), the batch folded into the queries
                q = q.transpose(1, 0, 2, 3).reshape(ng, b * pq, d)
                qa = jnp.broadcast_to(a[None, :, None], (ng, b, pq)).reshape(ng, b * pq)
                qt = jnp.broadcast_to(inv_temp[None, :, None], (ng, b, pq)).reshape(ng, b * pq)
            queries[name] = _kernel.Queries(q, qa, qt)
        return layout, queries

    @staticmethod
    def _assemble(layout, per_group, b, h, w, conditional):
        """Scatter per-group results ``[G, B·P, V]`` / ``[B, G, P, V]`` back to ``[B, H, W, V]``."""
        outs = []
        for name, g in layout.groups.items():
            ng, pq = g.qpos.shape
            m = per_group[name]
            v = m.shape[-1]
            if not conditional:
                m = m.reshape(ng, b, pq, v).transpose(1, 0, 2, 3)
            outs.append(m.reshape(b, ng * pq, v))
        return jnp.concatenate(outs, axis=1)[:, layout.inverse].reshape(b, h, w, -1)

    def _denoise_bounded(self, x_t, t, label, scale, bank_map=None, side=None):
        """``(x̂0, bound)``: every group through the machine's search over its prebuilt bank, or, where
        there is none (unprepared, or over ``bank_budget``), its windows streamed from the images
        (exact, bound 0). ``bank_map`` rewrites every chunk and ``side`` sets the window (the soft
        window machines; default ``scale``)."""
        b, h, w, ch = x_t.shape
        k = scale if side is None else side
        layout, queries = self._queries(x_t, t, label, k)
        prepared = self.banks.get(bank_key(k, label is not None))
        if prepared is not None:
            res = {name: self._run_bank(queries[name], prepared[name], label, g.bpos.shape[1], bank_map)
                   for name, g in layout.groups.items()}
        else:
            res = {name: (m, jnp.zeros(m.shape[:-1], m.dtype))
                   for name, m in self._stream_images(queries, layout, label, bank_map=bank_map).items()}
        cond = label is not None
        x0 = self._assemble(layout, {n: r[0] for n, r in res.items()}, b, h, w, cond)
        bound = self._assemble(layout, {n: r[1][..., None] for n, r in res.items()}, b, h, w, cond)
        return x0, bound[..., 0]

    def _stream_images(self, queries, layout, label, provenance=False, bank_map=None):
        """Each group in its own pass over the training images, gathering its windows chunk by chunk
        (a pass per group lets small groups, like bbELS corners, take many images per chunk).
        ``bank_map`` (optional) transforms each gathered chunk (e.g. the soft machines' window weights).

        With ``provenance``, each group's result is ``(means, ProvenanceSummary)`` with entry ids
        ``image·H·W + center`` (flat center position of the window in its training image)."""
        ch = self.image_shape[-1]
        cond = label is not None
        means = {}
        for name, g in layout.groups.items():
            ng, pb, kk = g.bidx.shape
            d = kk * ch
            mq = queries[name].q.shape[-2]
            lead = int(np.prod(queries[name].q.shape[:-2]))
            # per training image, as the TPU compiler keeps them live (the v5e compiles of
            # scripts/accelerator_check.py): the gathered windows twice (flat, and in the GEMM's
            # layout), the gather's int32 index table (as large: it is built for the whole chunk), the
            # values, and three logits-sized blocks per query (logits, their masked copy, the weights;
            # provenance: two more); large batches in query tiles
            per_query = 5 if provenance else 3
            per_entry = 4 * d + ch + 4 + (0 if bank_map is None else bank_map.extra_rows)
            tile = None
            if not cond and self.policy.chunk_size is None:
                tile = query_tile(self.policy.budget, lead, mq, per_entry, per_query)
            members, valid, nchunks, c = self._chunking(label, 4 * lead * pb * (per_entry + per_query * (tile or mq)))
            chunk = functools.partial(self._image_chunk, g, members, valid, c, cond)
            if bank_map is not None:
                chunk = lambda i, f=chunk: bank_map(f(i))  # noqa: E731
            if not provenance:
                means[name] = _kernel.streaming_softmax(queries[name], chunk, nchunks, query_tile=tile)[0]
                continue
            ids = functools.partial(self._image_chunk_ids, g, members, c, cond)
            mean, stats = _kernel.streaming_softmax(queries[name], lambda i, f=chunk, e=ids: (f(i), e(i)), nchunks,
                                                    query_tile=tile, provenance=True)
            means[name] = (mean, _kernel.summarize_provenance(stats, queries[name].inv_temp))
        return means

    def _image_chunk_ids(self, g, members, c, cond, i):
        """Ids ``image·H·W + center`` of the entries of :meth:`_image_chunk` ``i``, in its order."""
        h, w, _ = self.image_shape
        idx = jax.lax.dynamic_slice_in_dim(members, i * c, c, axis=1)  # [Gb, c]
        ng, pb = g.bpos.shape
        ids = idx[:, None, :, None] * (h * w) + jnp.asarray(g.bpos, jnp.int32)[None, :, None, :]
        ids = ids.reshape(idx.shape[0], ng, c * pb)
        return ids if cond else ids[0]

    def _denoise_provenance(self, x_t, t, label, scale):
        b, h, w, ch = x_t.shape
        layout, queries = self._queries(x_t, t, label, scale)
        res = self._stream_images(queries, layout, label, provenance=True)
        cond = label is not None
        x0 = self._assemble(layout, {n: r[0] for n, r in res.items()}, b, h, w, cond)

        def field(get):
            return self._assemble(layout, {n: get(r[1])[..., None] for n, r in res.items()}, b, h, w, cond)[..., 0]

        ids = field(lambda p: p.ids)
        pos = ids % (h * w)
        return x0, PixelProvenance(ids // (h * w), pos // w, pos % w, field(lambda p: p.weight),
                                   field(lambda p: p.entropy))

    def _image_chunk(self, g, members, valid, c, cond, i):
        h, w, ch = self.image_shape
        imgs, ok = self._chunk(members, valid, c, i)  # [Gb, c, H, W, C], [Gb, c]
        gb = imgs.shape[0]
        iz = _with_zero_slot(imgs.reshape(gb * c, h, w, ch)).reshape(gb, c, h * w + 1, ch)
        ng, pb, kk = g.bidx.shape
        vals = iz[:, :, g.bpos].transpose(0, 2, 1, 3, 4).reshape(gb, ng, c * pb, ch)
        present = jnp.broadcast_to(ok[:, None, :, None], (gb, ng, c, pb)).reshape(gb, ng, c * pb)
        if pb < _PACK_MIN_POSITIONS:
            # small groups (bbELS edges and corners, LS pixels): the packed layout costs more than
            # its GEMM saves
            keys = iz.reshape(gb, -1)[:, _window_index_rows(g, c, h * w, ch)].reshape(gb, ng, c * pb, kk * ch)
            bank = _kernel.make_bank(keys, vals, present)
        else:
            # One gather writes the kernel's packed keys [Gb, G, D+1, c·pb] directly (no transpose or
            # concatenation pass: at small k those passes cost as much as the GEMM): rows are the window's
            # pixels, the last row its ‖k‖², read from a per-image table of window norms.
            k = math.isqrt(kk)
            sq = _window_sq_norms(imgs.reshape(gb * c, h, w, ch), k).reshape(gb, c, h * w)
            sq = jnp.where(ok[..., None], sq, _kernel.PAD_SQ_NORM)
            src = jnp.concatenate([iz.reshape(gb, -1), sq.reshape(gb, -1)], axis=-1)
            keys_t = src[:, _packed_index(g, c, h * w, ch)].reshape(gb, ng, kk * ch + 1, c * pb)
            cnt = present.astype(vals.dtype)[..., None]
            bank = _kernel.PackedBank(keys_t, jnp.concatenate([cnt, cnt * vals], axis=-1))
        return bank if cond else jax.tree.map(lambda x: x[0], bank)


# Bank positions per image from which a streamed group is gathered into the packed layout
# (measured on 32x32 MNIST: faster for ELS/interior groups, slower for bbELS edges and corners).
_PACK_MIN_POSITIONS = 64


def _window_index_rows(g: _Group, c: int, hw: int, ch: int) -> np.ndarray:
    """``[G, c, Pb, kk·C]`` index into a chunk's ``c·(HW+1)·C`` pixels that gathers group ``g``'s
    windows as rows ``[G, c·Pb, D]`` (image-major), with no transpose pass."""
    ng, pb, kk = g.bidx.shape
    j = np.arange(c)[None, :, None, None]
    pix = (j * (hw + 1) + g.bidx[:, None])[..., None] * ch + np.arange(ch)  # [G, c, Pb, kk, C]
    return pix.reshape(ng, c, pb, kk * ch).astype(np.int32)


def _packed_index(g: _Group, c: int, hw: int, ch: int) -> np.ndarray:
    """``[G, D+1, c, Pb]`` index into a chunk's ``[c·(HW+1)·C pixels | c·HW window norms]`` that
    gathers the packed keys of group ``g``: window pixel ``e``, channel ``m`` of image ``j`` at row
    ``e·C + m``; the window's norm in the last row."""
    ng, pb, kk = g.bidx.shape
    j = np.arange(c)[None, None, :, None]
    pix = (j * (hw + 1) + g.bidx.transpose(0, 2, 1)[:, :, None, :])[:, :, None] * ch  # [G, kk, 1, c, Pb]
    pix = (pix + np.arange(ch)[None, None, :, None, None]).reshape(ng, kk * ch, c, pb)
    norms = c * (hw + 1) * ch + j * hw + g.bpos[:, None, None, :]  # [G, 1, c, Pb]
    return np.concatenate([pix, np.broadcast_to(norms, (ng, 1, c, pb))], axis=1).astype(np.int32)


def _window_sq_norms(x: Float[Array, "b h w c"], k: int) -> Float[Array, "b h w"]:
    """``Σ`` of ``x²`` over the zero-padded ``k×k`` window centered at each pixel (two separable
    box sums)."""
    x2 = jnp.sum(x * x, axis=-1)
    hk = k // 2
    pad = ((0, 0), (hk, hk), (0, 0))
    x2 = jax.lax.reduce_window(x2, 0.0, jax.lax.add, (1, k, 1), (1, 1, 1), pad)
    return jax.lax.reduce_window(x2, 0.0, jax.lax.add, (1, 1, k), (1, 1, 1), (pad[0], pad[2], pad[1]))


def _with_zero_slot(x: Float[Array, "b h w c"]) -> Float[Array, "b hw1 c"]:
    """Flatten the pixels and append one zero pixel: the target of out-of-image window indices."""
    b, h, w, c = x.shape
    return jnp.concatenate([x.reshape(b, h * w, c), jnp.zeros((b, 1, c), x.dtype)], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class LocalScore(_PatchMachine):
    """The local score machine (LS): each pixel's posterior over training images, from its
    zero-padded ``k×k`` window only. Build with :func:`local`."""

    def _kind(self) -> str:
        return "local"

    def check_scale(self, scale: Any) -> int:
        if scale is None:
            raise ValueError("scale: the local score machine needs a patch size (an odd int)")
        return _checks.check_scale(scale)


@dataclasses.dataclass(frozen=True, eq=False)
class EquivariantLocalScore(_PatchMachine):
    """The equivariant local score machine (ELS, ``padding="circular"``) and its boundary-broken
    variant (bbELS, ``padding="zeros"``). Build with :func:`els`."""

    padding: _checks.Padding = "circular"

    def __post_init__(self):
        _checks.check_padding(self.padding)

    def check_scale(self, scale: Any) -> int:
        if scale is None:
            raise ValueError("scale: the ELS machine needs a patch size (an odd int)")
        k = _checks.check_scale(scale)
        h, w, _ = self.image_shape
        if self.padding == "circular" and k > min(h, w):
            raise ValueError(
                f"scale: patch size {k} is larger than the {h}x{w} image: its patches would exceed the {min(h, w)}px "
                f"images (ELS needs k <= {min(h, w)}; its bank holds the patches lying fully inside a training image)"
            )
        return k


register(LocalScore)
register(EquivariantLocalScore)


def local(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    bank_budget: int | None = None,
    platform: str | None = None,
) -> LocalScore:
    """The local score machine (LS, zero padding).

    For each pixel ``p``: ``w_j(p) = softmax_j(−‖x_t[Ω_p] − a·φ_j[Ω_p]‖²/2s²)`` over training images
    ``φ_j`` with pixels outside the image counted as 0, and ``x̂0(p) = Σ_j w_j(p) φ_j(p)``. With
    ``k ≥ 2·max(H, W) − 1`` every window covers the whole image and LS equals the ideal score.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids; then ``denoise(..., label=y)`` searches class ``y`` only.
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        bank_budget: bytes one scale's prebuilt, deduplicated bank may take (``None``: per-backend
            default); beyond it windows are gathered from the images at every call.
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.local(imgs)
        >>> m.denoise(imgs[:2], 0.5, scale=3).shape
        (2, 8, 8, 1)
    """
    return build(
        LocalScore, images, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size, memory_budget=memory_budget,
        bank_budget=bank_budget, platform=platform,
    )


def els(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    padding: _checks.Padding = "circular",
    *,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    bank_budget: int | None = None,
    platform: str | None = None,
) -> EquivariantLocalScore:
    """The equivariant local score machine: ELS (``padding="circular"``) or bbELS (``"zeros"``).

    ELS: ``x̂0(p) = Σ_j softmax_j(−‖x_t[Ω_p] − a·P_j‖²/2s²) · P_j^center`` over every ``k×k`` patch
    ``P_j`` lying fully inside a training image (``(H−k+1)(W−k+1)`` per image), with ``Ω_p`` wrapping
    circularly. Requires ``k ≤ min(H, W)``.

    bbELS: ``x_t`` is zero padded; interior pixels use the ELS bank, a pixel within ``k//2`` of a
    border only zero-padded training windows with the same border offsets (see the module docstring).
    If ``k ≥ min(H, W)`` there is no interior: bbELS falls back to the local score machine (LS).

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids for conditional denoising.
        padding: ``"circular"`` (ELS) or ``"zeros"`` (bbELS).
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        bank_budget: bytes one scale's prebuilt, deduplicated bank may take (``None``: per-backend
            default); beyond it windows are gathered from the images at every call.
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.els(imgs, padding="zeros")
        >>> m.denoise(imgs[:2], 0.5, scale=3).shape
        (2, 8, 8, 1)
    """
    _checks.check_padding(padding)
    return build(
        EquivariantLocalScore, images, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size,
        memory_budget=memory_budget, bank_budget=bank_budget, padding=padding, platform=platform,
    )


def bbels(images, labels=None, **kwargs) -> EquivariantLocalScore:
    """The boundary-broken ELS machine: ``els(images, labels, padding="zeros", ...)``."""
    return els(images, labels, padding="zeros", **kwargs)


def _published(padding: str):
    """The default patch-size schedule of the ELS machine with ``padding``: the paper's, calibrated
    against the ResNet of the same padding on that dataset (:data:`ellsjax.presets.PUBLISHED_SCALES`)."""

    def default(dataset: str, image_shape: tuple[int, int, int], schedule: Any):
        from ellsjax.scales import ScaleSchedule

        name = _presets.published_scales(dataset, padding)
        if name is None:
            raise ValueError(f"no published scale schedule for {dataset} with {padding} padding; pass --scales")
        return ScaleSchedule.load(name)

    return default


_registry.register(_registry.MachineSpec(
    name="els", builder=els, machine=EquivariantLocalScore, padding="circular", family="els", calibration="grid",
    explains="circular", soft_twin="soft-els", default_scales=_published("circular"),
    summary="equivariant local score (circular padding): every k×k patch of every training image",
    reference="Kamb & Ganguli, arXiv 2412.20292, §4",
))
_registry.register(_registry.MachineSpec(
    name="bbels", builder=bbels, machine=EquivariantLocalScore, padding="zeros", family="els", calibration="grid",
    explains="zeros", soft_twin="soft-bbels", default_scales=_published("zeros"),
    summary="boundary-broken ELS (zero padding): border pixels meet patches with the same border offset",
    reference="Kamb & Ganguli, arXiv 2412.20292, §4",
))
_registry.register(_registry.MachineSpec(
    name="ls", builder=local, machine=LocalScore, padding="zeros", calibration="grid",
    default_scales=_published("zeros"),
    summary="local score: each pixel's k×k window against the same window of every training image",
    reference="Kamb & Ganguli, arXiv 2412.20292, §3",
))
