"""The paper's convolution-only diffusion networks in Flax NNX: a minimal ResNet and a minimal UNet.

Both predict the noise ``ε̂ = net(x_t, t, label)`` of ``x_t = a(t)·x0 + s(t)·ε`` and follow the
architectures of Kamb & Ganguli ("An analytic theory of creativity in convolutional diffusion models",
arXiv 2412.20292, App. C.1; reference code github.com/Kambm/convolutional_diffusion):

- **ResNet**: a sinusoidal time embedding (plus a learned class embedding when conditional); an
  up-projection conv ``C → width``; ``depth`` residual layers
  ``h ← h + ReLU(Conv(h + MLP_i(emb)))`` with ``MLP = Linear → GroupNorm(8) → ReLU``; a last
  ``h + MLP(emb)``; a down-projection conv ``width → C``. No normalization in the conv path unless
  ``norm="group"``. Every conv keeps the image size and uses the same padding, so the network is
  local (receptive field :attr:`NetConfig.receptive_field`) and, with circular padding, exactly
  equivariant to circular shifts.
- **UNet**: features ``width·2^i`` for ``i < depth`` (paper: 64, 128, 256); blocks of
  ``block_depth`` convs + ReLU, the embedding projected (``ReLU → Linear``) and added at each block's
  input; 2×2 max-pool down, 2×2 transposed conv up, skip concatenation; an output conv after adding
  a last embedding projection. As in the reference ``models.py``, ``kernel_size`` applies to the
  down blocks and the bottleneck; the up blocks always use 3×3 convs (the reference does not pass
  its kernel size on to them).
- **DDPM UNet** (``arch="ddpm-unet"``): Ho et al.'s UNet as in pytorch-ddpm, the "baseline UNet"
  of the locality papers (github.com/ottogin/locality-in-diffusion-models,
  ``src/local_diffusion/utils/neural_networks.py``): a fixed sinusoidal table of ``time_steps``
  rows → Linear → Swish → Linear (``4·width``); a 3×3 head; per level ``num_res_blocks`` residual
  blocks (GroupNorm(32) → Swish → conv, + the projected embedding, GroupNorm(32) → Swish → dropout
  → conv, 1×1 shortcut when the width changes, self-attention at the levels in ``attn``) and a
  stride-2 conv down; a middle of two residual blocks, the first with self-attention (unless
  ``mid_attn=False``: the same UNet without any attention when ``attn`` is empty too); up levels of
  ``num_res_blocks + 1`` blocks on the concatenated skips and a nearest ×2 upsample + conv; a
  GroupNorm → Swish → conv tail. Its time input is the DDPM step ``i = t·T − 1`` (``t = (i+1)/T``
  on :func:`ellsjax.schedules.ddpm_linear`); between integer steps the table's sinusoids are
  continued exactly.

The call convention is ``model(x_t [B,H,W,C], t [B] in [0,1], label [B] int | None) -> ε̂ [B,H,W,C]``.
Weights start from PyTorch's default initialization (uniform ``±1/√fan_in`` for kernels and biases,
``N(0, 1)`` class embeddings), as the paper's networks did, so training dynamics stay comparable.

Example:
    >>> import jax.numpy as jnp, ellsjax as ej
    >>> from flax import nnx
    >>> cfg = ej.nets.NetConfig(arch="resnet", channels=1, image_size=8, width=16, depth=1)
    >>> net = ej.nets.build(cfg, seed=0)
    >>> apply = nnx.jit(lambda net, x_t, t: net(x_t, t))  # or eagerly: net(x_t, t)
    >>> eps = apply(net, jnp.zeros((2, 8, 8, 1)), jnp.array([0.1, 0.9]))
    >>> eps.shape, cfg.receptive_field
    ((2, 8, 8, 1), 7)
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import presets as _presets

__all__ = [
    "ARCHS",
    "PADDINGS",
    "NetConfig",
    "Preset",
    "PRESETS",
    "PRESETS_SOURCE",
    "preset",
    "build",
    "attention_weights",
    "init",
    "sinusoidal_embedding",
    "TimeEmbedding",
    "ResNet",
    "UNet",
    "DDPMUNet",
    "ddpm_time_table",
    "ddpm_time_embedding",
    "count_params",
]

ARCHS: tuple[str, ...] = ("resnet", "unet", "ddpm-unet")
PADDINGS: tuple[str, ...] = _checks.PADDINGS
NORMS: tuple[str | None, ...] = (None, "group")
_FLAX_PADDING = {"zeros": "SAME", "circular": "CIRCULAR"}
# Architecture defaults: the paper's ResNet is 256 wide and 8 layers deep (CIFAR-10), its UNet has
# features 64, 128, 256 (2·32·2^i for i < 3) and a 256-dimensional embedding.
_DEFAULT_WIDTH = {"resnet": 256, "unet": 64, "ddpm-unet": 128}
_DEFAULT_DEPTH = {"resnet": 8, "unet": 3, "ddpm-unet": 4}
_UNET_EMB_DIM = 256
# Ho et al.'s CIFAR-10 UNet (pytorch-ddpm's defaults): channel multipliers per level
_DDPM_CH_MULT = (1, 2, 2, 2)
_DDPM_GROUPS = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetConfig:
    """A frozen, hashable description of one network (everything needed to rebuild it).

    Attributes:
        arch: ``"resnet"`` or ``"unet"``.
        channels: image channels ``C`` (1 for MNIST, 3 for CIFAR-10).
        image_size: side ``S`` of the square training images (the UNet needs ``S`` divisible by
            ``2^(depth−1)``).
        width: ResNet: hidden channels (also the embedding size; a multiple of 8, at least 16,
            for the embedding's GroupNorm(8)). UNet: features of the first level, doubling at each level.
            ``None`` picks the paper's value (ResNet 256, UNet 64).
        depth: ResNet: number of residual layers. UNet: number of levels (``≥ 2``). ``None``
            picks the paper's value (ResNet 8, UNet 3).
        padding: ``"zeros"`` or ``"circular"``, for every conv.
        norm: ``None`` (the paper's default) or ``"group"``: GroupNorm after every conv (ResNet:
            8 groups, and before the down-projection; UNet: ``min(32, features)`` groups).
        conditional: add a learned class embedding; the network then requires labels.
        num_classes: number of classes (required when ``conditional``).
        kernel_size: odd conv kernel size.
        out_kernel_size: odd kernel size of the last conv (the paper's training script: 3).
        emb_dim: UNet embedding size (``None``: 256). The ResNet's embedding size is its width;
            the DDPM UNet's is ``4·width``.
        block_depth: UNet convs per block.
        add_one: ResNet: add a last embedding MLP before the down-projection (the reference's
            ``add_one``, default ``True``); without it the state is doubled there instead.
        ch_mult: DDPM UNet: width multiplier per level (``None``: ``(1, 2, 2, 2)``); ``depth`` is
            its length.
        attn: DDPM UNet: levels (indices into ``ch_mult``) whose residual blocks end in
            self-attention.
        mid_attn: DDPM UNet: the middle's first residual block ends in self-attention (Ho et al.'s
            UNet, the default); ``False`` with ``attn=()`` is the same network without attention, a
            purely convolutional control.
        num_res_blocks: DDPM UNet: residual blocks per down level (``+1`` per up level).
        dropout: DDPM UNet: dropout rate inside the residual blocks, applied in training only.
        time_steps: DDPM UNet: rows ``T`` of the sinusoidal time table (the DDPM steps).
    """

    arch: str = "resnet"
    channels: int = 1
    image_size: int = 32
    width: int | None = None
    depth: int | None = None
    padding: str = "zeros"
    norm: str | None = None
    conditional: bool = False
    num_classes: int | None = None
    kernel_size: int = 3
    out_kernel_size: int = 3
    emb_dim: int | None = None
    block_depth: int = 2
    add_one: bool = True
    ch_mult: tuple[int, ...] | None = None
    attn: tuple[int, ...] = ()
    mid_attn: bool = True
    num_res_blocks: int = 2
    dropout: float = 0.0
    time_steps: int = 1000

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch: unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        _checks.check_padding(self.padding)
        if self.norm not in NORMS:
            raise ValueError(f"norm: must be None or 'group', got {self.norm!r}")
        _checks.check_positive_int(self.channels, "channels")
        _checks.check_positive_int(self.image_size, "image_size")
        for name in ("kernel_size", "out_kernel_size"):
            k = _checks.check_positive_int(getattr(self, name), name)
            if k % 2 == 0:
                raise ValueError(f"{name}: must be odd (a 'same' conv needs a center pixel), got {k}")
        _checks.check_positive_int(self.block_depth, "block_depth")
        if not isinstance(self.add_one, bool):
            raise ValueError(f"add_one: expected a bool, got {self.add_one!r}")
        if self.arch == "ddpm-unet":
            self._check_ddpm()
        elif self.ch_mult is not None or self.attn or self.dropout or self.mid_attn is not True:
            raise ValueError("ch_mult, attn, mid_attn, dropout: options of arch='ddpm-unet' only")
        # fill in the paper's defaults (frozen: set through object.__setattr__)
        width = _DEFAULT_WIDTH[self.arch] if self.width is None else _checks.check_positive_int(self.width, "width")
        depth = _DEFAULT_DEPTH[self.arch] if self.depth is None else _checks.check_positive_int(self.depth, "depth")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "depth", depth)
        if self.arch == "ddpm-unet":
            if self.emb_dim is not None and self.emb_dim != 4 * width:
                raise ValueError(f"emb_dim: the DDPM UNet's embedding is 4·width = {4 * width}, got {self.emb_dim}")
            object.__setattr__(self, "emb_dim", 4 * width)
            if depth != len(self.ch_mult):
                raise ValueError(f"depth: the DDPM UNet has len(ch_mult) = {len(self.ch_mult)} levels, got {depth}")
            bad = [f for f in self.features if f % _DDPM_GROUPS]
            if bad:
                raise ValueError(f"width: the DDPM UNet's GroupNorm({_DDPM_GROUPS}) needs every level's width "
                                 f"(width·ch_mult) divisible by {_DDPM_GROUPS}, got {bad}")
            if self.image_size % 2 ** (depth - 1):
                raise ValueError(f"image_size: a {depth}-level DDPM UNet halves the image {depth - 1} times, so "
                                 f"image_size must be divisible by {2 ** (depth - 1)}, got {self.image_size}")
        elif self.arch == "resnet":
            if self.emb_dim is not None and self.emb_dim != width:
                raise ValueError(f"emb_dim: the ResNet adds the embedding to its state, so emb_dim must equal "
                                 f"width={width} (or be None), got {self.emb_dim}")
            object.__setattr__(self, "emb_dim", width)
            if width % 8 or width < 16:
                # with 8 channels every group holds one channel, which GroupNorm maps to 0: the
                # network would silently ignore t and the label
                raise ValueError(f"width: the ResNet's embedding MLP uses GroupNorm(8), so width must be a "
                                 f"multiple of 8 and at least 16, got {width}")
        else:
            emb = _UNET_EMB_DIM if self.emb_dim is None else _checks.check_positive_int(self.emb_dim, "emb_dim")
            object.__setattr__(self, "emb_dim", emb)
            if depth < 2:
                raise ValueError(f"depth: the UNet needs at least 2 levels (one down block and a bottleneck), got {depth}")
            if self.image_size % 2 ** (depth - 1):
                raise ValueError(f"image_size: a {depth}-level UNet pools {depth - 1} times, so image_size must be "
                                 f"divisible by {2 ** (depth - 1)}, got {self.image_size}")
            if self.norm == "group":
                bad = [f for f in self.features if f % min(32, f)]
                if bad:
                    raise ValueError(f"width: GroupNorm(min(32, f)) needs features divisible by 32 above 32, got {bad}")
        if self.emb_dim < 4 or self.emb_dim % 2:
            raise ValueError(f"emb_dim: the sinusoidal embedding needs an even size >= 4, got {self.emb_dim}")
        if not isinstance(self.conditional, bool):
            raise ValueError(f"conditional: expected a bool, got {self.conditional!r}")
        if self.conditional:
            if self.num_classes is None:
                raise ValueError("num_classes: required for a conditional network")
            _checks.check_positive_int(self.num_classes, "num_classes")
        elif self.num_classes is not None:
            _checks.check_positive_int(self.num_classes, "num_classes")

    def _check_ddpm(self) -> None:
        mult = _DDPM_CH_MULT if self.ch_mult is None else self.ch_mult
        if isinstance(mult, list):
            mult = tuple(mult)
        if not isinstance(mult, tuple) or not mult:
            raise ValueError(f"ch_mult: expected a non-empty tuple of positive ints, got {self.ch_mult!r}")
        for m in mult:
            _checks.check_positive_int(m, "ch_mult")
        object.__setattr__(self, "ch_mult", mult)
        if self.depth is None:
            object.__setattr__(self, "depth", len(mult))
        attn = tuple(self.attn) if isinstance(self.attn, (list, tuple)) else self.attn
        if not isinstance(attn, tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in attn):
            raise ValueError(f"attn: expected a tuple of level indices, got {self.attn!r}")
        if any(not 0 <= i < len(mult) for i in attn) or len(set(attn)) != len(attn):
            raise ValueError(f"attn: level indices must be distinct and lie in [0, {len(mult)}), got {attn}")
        object.__setattr__(self, "attn", tuple(sorted(attn)))
        if not isinstance(self.mid_attn, bool):
            raise ValueError(f"mid_attn: expected a bool, got {self.mid_attn!r}")
        _checks.check_positive_int(self.num_res_blocks, "num_res_blocks")
        _checks.check_positive_int(self.time_steps, "time_steps")
        if self.time_steps < 2:
            raise ValueError(f"time_steps: need at least 2 steps, got {self.time_steps}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {d!r}")
        fixed = {"padding": ("zeros", self.padding), "norm": (None, self.norm), "kernel_size": (3, self.kernel_size),
                 "out_kernel_size": (3, self.out_kernel_size), "conditional": (False, self.conditional)}
        bad = {k: got for k, (want, got) in fixed.items() if want != got}
        if bad:
            raise ValueError(f"{', '.join(bad)}: the DDPM UNet has zero padding, built-in GroupNorm, 3x3 convs and "
                             f"no class input; got {bad}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images the network takes."""
        return (self.image_size, self.image_size, self.channels)

    @property
    def features(self) -> tuple[int, ...]:
        """UNet features per level, ``width·2^i`` (DDPM UNet: ``width·ch_mult[i]``; ResNet: ``(width,)``)."""
        if self.arch == "resnet":
            return (self.width,)
        if self.arch == "ddpm-unet":
            return tuple(self.width * m for m in self.ch_mult)
        return tuple(self.width * 2**i for i in range(self.depth))

    @property
    def receptive_field(self) -> int | None:
        """Side of the square of input pixels one output pixel depends on (ResNet only, else ``None``).

        ``2R + 1`` with ``R = (kernel_size//2)·(depth + 1) + out_kernel_size//2``: the
        up-projection, ``depth`` residual convs and the down-projection each widen it.
        """
        if self.arch != "resnet":
            return None
        r = (self.kernel_size // 2) * (self.depth + 1) + self.out_kernel_size // 2
        return 2 * r + 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        """Rebuild a config from :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown network option(s) {unknown}; known: {sorted(names)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists -> tuples
        return cls(**d)


# --------------------------------------------------------------------------- building blocks


def _host_rng(key: jax.Array) -> np.random.Generator | None:
    """A numpy generator seeded by a concrete JAX key, or ``None`` for an abstract (traced) key."""
    if isinstance(key, jax.core.Tracer):
        return None
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


# Initializers draw with numpy from the JAX key they are given. Drawing with jax.random instead
# compiles a separate program per weight shape (or one large threefry program), which takes
# seconds on CPU for even a tiny network; numpy also makes the weights identical on every backend.
def _uniform(fan_in: int):
    """PyTorch's default init for conv/linear weights and biases: U(−1/√fan_in, 1/√fan_in)."""
    return _symmetric_uniform(1.0 / math.sqrt(fan_in))


def _symmetric_uniform(bound: float):
    """An initializer drawing U(−bound, bound) (on the host where :func:`_host_rng` allows)."""

    def init(key, shape, dtype=jnp.float32):
        rng = _host_rng(key)
        if rng is None:
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)

    return init


def _normal(std: float):
    def init(key, shape, dtype=jnp.float32):
        rng = _host_rng(key)
        if rng is None:
            return std * jax.random.normal(key, shape, dtype)
        return jnp.asarray(std * rng.standard_normal(shape), dtype)

    return init


def _constant(value: float):
    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(np.full(shape, value), dtype)

    return init


def _conv(cin: int, cout: int, k: int, padding: str, rngs: nnx.Rngs) -> nnx.Conv:
    fan_in = cin * k * k
    return nnx.Conv(cin, cout, (k, k), padding=_FLAX_PADDING[padding],
                    kernel_init=_uniform(fan_in), bias_init=_uniform(fan_in), rngs=rngs)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=_uniform(cin), bias_init=_uniform(cin), rngs=rngs)


def _group_norm(c: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # PyTorch's epsilon and a two-pass variance
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-5, use_fast_variance=False,
                         scale_init=_constant(1.0), bias_init=_constant(0.0), rngs=rngs)


def sinusoidal_embedding(t: Float[ArrayLike, " b"], dim: int) -> Float[Array, "b dim"]:
    """The paper's time embedding: ``[sin(t·f_i), cos(t·f_i)]``, ``f_i = 10000^(−i/(d−1))``, ``d = dim/2``.

    ``t`` is used as is (in ``[0, 1]``, not scaled to 1000 steps), as in the reference.

    Example:
        >>> import jax.numpy as jnp
        >>> e = sinusoidal_embedding(jnp.array([0.0, 1.0]), 4)
        >>> [round(float(v), 4) for v in e[1]]
        [0.8415, 0.0001, 0.5403, 1.0]
    """
    d = dim // 2
    freqs = 10000.0 ** (-jnp.arange(d, dtype=jnp.float32) / (d - 1))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class TimeEmbedding(nnx.Module):
    """Sinusoidal time embedding plus, when conditional, a learned class embedding (``nnx.Embed``)."""

    def __init__(self, dim: int, *, num_classes: int | None = None, rngs: nnx.Rngs):
        self.dim = dim
        self.classes = (
            None if num_classes is None
            else nnx.Embed(num_classes, dim, embedding_init=_normal(1.0), rngs=rngs)
        )

    def __call__(self, t: Float[Array, " b"], label: Int[Array, " b"] | None = None) -> Float[Array, "b d"]:
        emb = sinusoidal_embedding(t, self.dim)
        if self.classes is not None:
            emb = emb + self.classes(label)
        return emb


def _check_call(config: NetConfig, x: Array, t: Array, label: Array | None) -> tuple[Array, Array]:
    if x.ndim != 4 or tuple(x.shape[1:]) != config.image_shape:
        s = config.image_shape
        raise ValueError(f"x_t: expected shape [B, {s[0]}, {s[1]}, {s[2]}], got {tuple(x.shape)}")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise ValueError(f"t: expected a scalar or shape [{x.shape[0]}], got {t.shape}")
    if config.conditional and label is None:
        raise ValueError("label: this network is class-conditional; pass one class id per image")
    if not config.conditional and label is not None:
        raise ValueError("label: this network is unconditional; pass label=None")
    if label is not None and jnp.shape(label) != x.shape[:1]:
        raise ValueError(f"label: expected shape [{x.shape[0]}], got {jnp.shape(label)}")
    return x, t


# --------------------------------------------------------------------------- ResNet


class _EmbMLP(nnx.Module):
    """``Linear → GroupNorm(8) → ReLU`` on the embedding vector."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.linear = _linear(dim, dim, rngs)
        self.norm = _group_norm(dim, 8, rngs)

    def __call__(self, emb):
        return jax.nn.relu(self.norm(self.linear(emb)))


class _ResidualLayer(nnx.Module):
    def __init__(self, c: NetConfig, rngs: nnx.Rngs):
        self.emb = _EmbMLP(c.width, rngs)
        self.conv = _conv(c.width, c.width, c.kernel_size, c.padding, rngs)
        self.norm = _group_norm(c.width, 8, rngs) if c.norm == "group" else None

    def __call__(self, h, emb):
        z = self.conv(h + self.emb(emb)[:, None, None, :])
        if self.norm is not None:
            z = self.norm(z)
        return h + jax.nn.relu(z)


class ResNet(nnx.Module):
    """The paper's minimal ResNet (see the module docstring). Build it with :func:`build`."""

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        if config.arch != "resnet":
            raise ValueError(f"config: expected arch='resnet', got {config.arch!r}")
        c = config
        self.config = c
        self.embed = TimeEmbedding(c.width, num_classes=c.num_classes if c.conditional else None, rngs=rngs)
        self.up = _conv(c.channels, c.width, c.kernel_size, c.padding, rngs)
        self.layers = nnx.List([_ResidualLayer(c, rngs) for _ in range(c.depth)])
        self.last_emb = _EmbMLP(c.width, rngs) if c.add_one else None
        self.out_norm = _group_norm(c.width, 8, rngs) if c.norm == "group" else None
        self.down = _conv(c.width, c.channels, c.out_kernel_size, c.padding, rngs)

    def __call__(
        self, x_t: Float[Array, "b h w c"], t: Float[ArrayLike, " b"], label: Int[Array, " b"] | None = None
    ) -> Float[Array, "b h w c"]:
        x_t, t = _check_call(self.config, x_t, t, label)
        emb = self.embed(t, label)
        h = self.up(x_t)
        for layer in self.layers:
            h = layer(h, emb)
        # without add_one the reference adds the state to itself
        h = h + (self.last_emb(emb)[:, None, None, :] if self.last_emb is not None else h)
        if self.out_norm is not None:
            h = self.out_norm(h)
        return self.down(h)


# --------------------------------------------------------------------------- UNet


class _UBlock(nnx.Module):
    """``x + Linear(ReLU(emb))``, then ``block_depth`` × (conv [→ GroupNorm] → ReLU)."""

    def __init__(self, cin: int, cout: int, c: NetConfig, rngs: nnx.Rngs, kernel_size: int | None = None):
        k = c.kernel_size if kernel_size is None else kernel_size
        self.emb = _linear(c.emb_dim, cin, rngs)
        self.convs = nnx.List([
            _conv(cin if i == 0 else cout, cout, k, c.padding, rngs) for i in range(c.block_depth)
        ])
        self.norms = (
            nnx.List([_group_norm(cout, min(32, cout), rngs) for _ in range(c.block_depth)])
            if c.norm == "group" else None
        )

    def __call__(self, x, emb):
        x = x + self.emb(jax.nn.relu(emb))[:, None, None, :]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = jax.nn.relu(x)
        return x


def _max_pool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UNet(nnx.Module):
    """The paper's minimal UNet (see the module docstring). Build it with :func:`build`."""

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        if config.arch != "unet":
            raise ValueError(f"config: expected arch='unet', got {config.arch!r}")
        c = config
        f = c.features
        self.config = c
        self.embed = TimeEmbedding(c.emb_dim, num_classes=c.num_classes if c.conditional else None, rngs=rngs)
        ins = (c.channels, *f[:-2])
        self.down_blocks = nnx.List([_UBlock(cin, cout, c, rngs) for cin, cout in zip(ins, f[:-1])])
        self.bottleneck = _UBlock(f[-2], f[-1], c, rngs)
        self.ups = nnx.List([
            # PyTorch's ConvTranspose2d computes its fan-in from the output channels
            nnx.ConvTranspose(f[i], f[i - 1], (2, 2), strides=(2, 2), padding="VALID",
                              kernel_init=_uniform(f[i - 1] * 4), bias_init=_uniform(f[i - 1] * 4), rngs=rngs)
            for i in range(len(f) - 1, 0, -1)
        ])
        # the reference builds its up blocks with UBlock's default kernel size, 3
        self.up_blocks = nnx.List([_UBlock(2 * f[i - 1], f[i - 1], c, rngs, kernel_size=3)
                                   for i in range(len(f) - 1, 0, -1)])
        self.last_emb = _linear(c.emb_dim, f[0], rngs)
        self.out = _conv(f[0], c.channels, c.out_kernel_size, c.padding, rngs)

    def __call__(
        self, x_t: Float[Array, "b h w c"], t: Float[ArrayLike, " b"], label: Int[Array, " b"] | None = None
    ) -> Float[Array, "b h w c"]:
        x, t = _check_call(self.config, x_t, t, label)
        emb = self.embed(t, label)
        skips = []
        for block in self.down_blocks:
            x = block(x, emb)
            skips.append(x)
            x = _max_pool2(x)
        x = self.bottleneck(x, emb)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = block(jnp.concatenate([skip, up(x)], axis=-1), emb)
        return self.out(x + self.last_emb(jax.nn.relu(emb))[:, None, None, :])


# --------------------------------------------------------------------------- DDPM UNet


def _xavier(fan_in: int, fan_out: int, gain: float = 1.0):
    """PyTorch's ``xavier_uniform_``: U(−b, b), ``b = gain·√(6/(fan_in + fan_out))`` (pytorch-ddpm's init)."""
    return _symmetric_uniform(gain * math.sqrt(6.0 / (fan_in + fan_out)))


def _xconv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, gain: float = 1.0) -> nnx.Conv:
    # explicit symmetric padding: torch's padding=k//2 (Flax's "SAME" pads a stride-2 conv on one side only)
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                    kernel_init=_xavier(cin * k * k, cout * k * k, gain), bias_init=_constant(0.0), rngs=rngs)


def _xlinear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=_xavier(cin, cout), bias_init=_constant(0.0), rngs=rngs)


def ddpm_time_table(steps: int, dim: int) -> np.ndarray:
    """pytorch-ddpm's fixed time table ``[steps, dim]``: row ``i`` interleaves ``sin(i·w_k), cos(i·w_k)``,
    ``w_k = exp(−2k/dim · log 10000)``, computed in float32 in the reference's order.

    Example:
        >>> [round(float(v), 3) for v in ddpm_time_table(1000, 4)[1]]
        [0.841, 0.54, 0.01, 1.0]
    """
    return _ddpm_table(int(steps), int(dim)).copy()


@functools.lru_cache(maxsize=8)
def _ddpm_table(steps: int, dim: int) -> np.ndarray:
    freqs = _ddpm_freqs(dim)
    arg = np.arange(steps, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.stack([np.sin(arg), np.cos(arg)], axis=-1).reshape(steps, dim)
    table.flags.writeable = False
    return table


def _ddpm_freqs(dim: int) -> np.ndarray:
    return np.exp(-(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim) * np.float32(math.log(10000))))


def ddpm_time_embedding(t: Float[ArrayLike, " b"], steps: int, dim: int) -> Float[Array, "b dim"]:
    """The DDPM UNet's time embedding at ``t``: the table row of step ``i = t·steps − 1``.

    At the grid ``t = (i+1)/steps`` (to within 1e-3 of a step, float32's rounding of ``t·steps``)
    this is exactly row ``i`` of :func:`ddpm_time_table`, as the reference's integer lookup gives;
    between steps (and below the first, at ``t < 1/steps``) each sinusoid is continued exactly,
    ``sin((i+f)·w) = sin(i·w)·cos(f·w) + cos(i·w)·sin(f·w)``.
    """
    table = jnp.asarray(_ddpm_table(steps, dim))
    w = jnp.asarray(_ddpm_freqs(dim))
    pos = jnp.asarray(t, jnp.float32) * steps - 1.0
    n = jnp.clip(jnp.round(pos), 0, steps - 1)
    f = pos - n
    f = jnp.where(jnp.abs(f) < 1e-3, 0.0, f)
    row = table[n.astype(jnp.int32)]
    s, c = row[:, 0::2], row[:, 1::2]
    fw = f[:, None] * w[None, :]
    cf, sf = jnp.cos(fw), jnp.sin(fw)
    return jnp.stack([s * cf + c * sf, c * cf - s * sf], axis=-1).reshape(row.shape)


def _gn32(c: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return _group_norm(c, _DDPM_GROUPS, rngs)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


# Set by attention_weights(): the list that the attention layers of an eager call append their weights to.
_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("ellsjax_attention_capture", default=None)


def attention_weights(
    model: nnx.Module, x_t: Float[Array, "b h w c"], t: Float[ArrayLike, " b"], label: Int[Array, " b"] | None = None,
) -> list[tuple[int, int, Float[Array, "b n n"]]]:
    """The self-attention weights of every attention layer of a DDPM UNet on one (eager) call.

    Returns ``[(H_l, W_l, A_l)]`` in call order: ``A_l[b, i, j]`` is how much query pixel ``i``
    (row-major over the layer's ``H_l×W_l`` grid) attends to pixel ``j`` (rows sum to 1). Runs the
    model eagerly (not under ``jax.jit``, where the weights would be tracers).

    Example:
        >>> import jax.numpy as jnp, ellsjax as ej
        >>> cfg = ej.nets.NetConfig(arch="ddpm-unet", image_size=8, width=32, ch_mult=(1, 2), num_res_blocks=1,
        ...                         attn=(0,))
        >>> maps = attention_weights(ej.nets.build(cfg), jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 0.5))
        >>> [(h, w, a.shape) for h, w, a in maps]
        [(8, 8, (2, 64, 64)), (4, 4, (2, 16, 16)), (8, 8, (2, 64, 64)), (8, 8, (2, 64, 64))]
    """
    if isinstance(x_t, jax.core.Tracer):
        raise TypeError("x_t: attention_weights runs the model eagerly; call it outside jax.jit")
    record: list = []
    token = _CAPTURE.set(record)
    try:
        model(x_t, t, label)
    finally:
        _CAPTURE.reset(token)
    return record


class _Attention(nnx.Module):
    """Single-head self-attention over the pixels: ``x + proj(softmax(q·kᵀ/√C)·v)`` on ``GroupNorm(x)``."""

    def __init__(self, c: int, rngs: nnx.Rngs):
        self.norm = _gn32(c, rngs)
        self.q = _xconv(c, c, 1, rngs)
        self.k = _xconv(c, c, 1, rngs)
        self.v = _xconv(c, c, 1, rngs)
        self.proj = _xconv(c, c, 1, rngs, gain=1e-5)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, h * w, c) for m in (self.q, self.k, self.v))
        att = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * (int(c) ** -0.5), axis=-1)
        record = _CAPTURE.get()
        if record is not None:
            record.append((h, w, att))
        return x + self.proj(jnp.einsum("bij,bjc->bic", att, v).reshape(b, h, w, c))


class _DDPMResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool, rngs: nnx.Rngs):
        self.norm1 = _gn32(cin, rngs)
        self.conv1 = _xconv(cin, cout, 3, rngs)
        self.temb = _xlinear(tdim, cout, rngs)
        self.norm2 = _gn32(cout, rngs)
        self.conv2 = _xconv(cout, cout, 3, rngs, gain=1e-5)
        self.shortcut = _xconv(cin, cout, 1, rngs) if cin != cout else None
        self.attn = _Attention(cout, rngs) if attn else None
        self.dropout = dropout

    def __call__(self, x, temb, key=None):
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = h + self.temb(jax.nn.swish(temb))[:, None, None, :]
        h = self.conv2(_dropout(jax.nn.swish(self.norm2(h)), self.dropout, key))
        h = h + (self.shortcut(x) if self.shortcut is not None else x)
        return self.attn(h) if self.attn is not None else h


class _Down(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv = _xconv(c, c, 3, rngs, stride=2)

    def __call__(self, x):
        return self.conv(x)


class _Up(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv = _xconv(c, c, 3, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest-neighbour ×2


class DDPMUNet(nnx.Module):
    """Ho et al.'s DDPM UNet (see the module docstring). Build it with :func:`build`.

    ``model(x_t, t, label=None, *, dropout_key=None)``: ``dropout_key`` (a JAX key) turns dropout
    on, as in training; without it the network is deterministic (the reference's ``eval()``).
    """

    def __init__(self, config: NetConfig, *, rngs: nnx.Rngs):
        if config.arch != "ddpm-unet":
            raise ValueError(f"config: expected arch='ddpm-unet', got {config.arch!r}")
        c = config
        ch, tdim = c.width, c.emb_dim
        self.config = c
        self.time1 = _xlinear(ch, tdim, rngs)
        self.time2 = _xlinear(tdim, tdim, rngs)
        self.head = _xconv(c.channels, ch, 3, rngs)
        blocks, chs, now = [], [ch], ch
        for i, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                blocks.append(_DDPMResBlock(now, ch * mult, tdim, c.dropout, i in c.attn, rngs))
                now = ch * mult
                chs.append(now)
            if i != len(c.ch_mult) - 1:
                blocks.append(_Down(now, rngs))
                chs.append(now)
        self.down = nnx.List(blocks)
        self.middle = nnx.List([_DDPMResBlock(now, now, tdim, c.dropout, c.mid_attn, rngs),
                                _DDPMResBlock(now, now, tdim, c.dropout, False, rngs)])
        blocks = []
        for i, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                blocks.append(_DDPMResBlock(chs.pop() + now, ch * mult, tdim, c.dropout, i in c.attn, rngs))
                now = ch * mult
            if i != 0:
                blocks.append(_Up(now, rngs))
        self.up = nnx.List(blocks)
        self.tail_norm = _gn32(now, rngs)
        self.tail = _xconv(now, c.channels, 3, rngs, gain=1e-5)

    def __call__(
        self, x_t: Float[Array, "b h w c"], t: Float[ArrayLike, " b"], label: Int[Array, " b"] | None = None,
        *, dropout_key: jax.Array | None = None,
    ) -> Float[Array, "b h w c"]:
        x, t = _check_call(self.config, x_t, t, label)
        c = self.config
        temb = ddpm_time_embedding(t, c.time_steps, c.width)
        temb = self.time2(jax.nn.swish(self.time1(temb)))
        counter = iter(range(1 << 30))

        def key():
            return None if dropout_key is None else jax.random.fold_in(dropout_key, next(counter))

        h = self.head(x)
        hs = [h]
        for block in self.down:
            h = block(h, temb, key()) if isinstance(block, _DDPMResBlock) else block(h)
            hs.append(h)
        for block in self.middle:
            h = block(h, temb, key())
        for block in self.up:
            if isinstance(block, _DDPMResBlock):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), temb, key())
            else:
                h = block(h)
        return self.tail(jax.nn.swish(self.tail_norm(h)))


def init(config: NetConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a network from a JAX key and split it: returns ``(graphdef, state)`` (see ``nnx.split``)."""
    if not isinstance(config, NetConfig):
        raise TypeError(f"config: expected a NetConfig, got {type(config).__name__}")
    return nnx.split(_construct(config, nnx.Rngs(key)))


def _construct(config: NetConfig, rngs: nnx.Rngs) -> ResNet | UNet | DDPMUNet:
    return {"resnet": ResNet, "unet": UNet, "ddpm-unet": DDPMUNet}[config.arch](config, rngs=rngs)


def build(config: NetConfig, *, seed: int = 0, rngs: nnx.Rngs | None = None) -> ResNet | UNet | DDPMUNet:
    """Build (and initialize) the network a :class:`NetConfig` describes.

    Args:
        config: the network.
        seed: initialization seed (ignored when ``rngs`` is given).
        rngs: NNX random streams, for callers that manage their own.

    Example:
        >>> import ellsjax as ej
        >>> net = ej.nets.build(ej.nets.NetConfig(image_size=8, width=16, depth=1), seed=0)
        >>> type(net).__name__, ej.nets.count_params(net)
        ('ResNet', 3233)
    """
    if not isinstance(config, NetConfig):
        raise TypeError(f"config: expected a NetConfig, got {type(config).__name__}")
    return _construct(config, nnx.Rngs(seed) if rngs is None else rngs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters of an NNX model."""
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------- presets


class Preset(NamedTuple):
    """One of the paper's trained networks: the network, its dataset and its training length.

    Attributes:
        net: the network.
        dataset: the :func:`ellsjax.data.load` name it was trained on.
        epochs: passes over the training set (the reference training script's default, 300).
    """

    net: NetConfig
    dataset: str
    epochs: int = 300


PRESETS_SOURCE = _presets.NETWORKS_SOURCE


def _preset_table() -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for name, spec in _presets.NETWORKS.items():
        net = NetConfig(arch=spec.arch, channels=spec.channels, image_size=32, padding=spec.padding,
                        conditional=spec.conditional, num_classes=10 if spec.conditional else None)
        table[name] = Preset(net=net, dataset=spec.dataset, epochs=spec.epochs)
    return table


#: The paper's networks, keyed like :data:`ellsjax.presets.PAPER_SCALES` (whose scale schedules
#: were calibrated against them). All at 32×32 (MNIST and Fashion-MNIST resized from 28, CelebA
#: center-cropped and resized). ResNets: width 256, 8 layers — the depth the authors' README uses
#: for CIFAR-10; the release records no other depth, so the same 8 layers are used for every
#: dataset (an assumption). UNets: features 64, 128, 256 and a 256-wide embedding (the training
#: script's defaults). All: kernel 3, last kernel 3, no normalization, trained 300 epochs with
#: AdamW (lr 1e-4, no weight decay, per-step decay 0.999965), batch 128 (see
#: :class:`ellsjax.training.TrainConfig`).
PRESETS: dict[str, Preset] = _preset_table()


def preset(name: str) -> Preset:
    """Look a paper network up in :data:`PRESETS`.

    Example:
        >>> p = preset("CIFAR10_ResNet_zeros_conditional")
        >>> p.dataset, p.net.width, p.net.depth, p.net.channels, p.net.conditional
        ('cifar10', 256, 8, 3, True)
    """
    if name not in PRESETS:
        raise ValueError(f"preset: unknown network preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
