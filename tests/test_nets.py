"""The paper's networks: the embedding formula, locality, equivariance, labels, configs and presets."""

import dataclasses
import json
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ellsjax as ej
from ellsjax import nets

RES = nets.NetConfig(arch="resnet", image_size=12, width=16, depth=2)


@partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, label):
    return nnx.merge(graphdef, state)(x, t, label)


def jitted(model):
    """A jitted ``(x, t, label) -> ε̂`` of an NNX model (compiled once per network structure)."""
    graphdef, state = nnx.split(model)
    return lambda x, t, label=None: _apply(graphdef, state, x, t, label)


UNET_CIRC = nets.NetConfig(arch="unet", channels=3, image_size=8, width=8, depth=2, emb_dim=16, norm="group",
                           padding="circular")


def rand(shape, seed=0):
    # numpy: a jax.random draw compiles a threefry program, which takes seconds on a small CPU
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_time_embedding_is_the_papers_formula():
    t = np.array([0.0, 0.37, 1.0], np.float32)
    d = 5
    freqs = 10000.0 ** (-np.arange(d) / (d - 1))
    want = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(nets.sinusoidal_embedding(jnp.asarray(t), 2 * d), want, atol=1e-6)


@pytest.mark.parametrize("cfg", [RES, UNET_CIRC], ids=["resnet", "unet-group-circular-rgb"])
def test_output_shape_and_finite(cfg):
    s, c = cfg.image_size, cfg.channels
    out = jitted(nets.build(cfg))(rand((3, s, s, c)), jnp.array([0.0, 0.5, 1.0]))
    assert out.shape == (3, s, s, c) and np.all(np.isfinite(np.asarray(out)))


def test_circular_resnet_is_equivariant_to_circular_shifts():
    x = rand((2, 12, 12, 1))
    t = jnp.array([0.3, 0.8])
    shift = lambda v: jnp.roll(v, (3, -5), axis=(1, 2))  # noqa: E731
    circ = jitted(nets.build(dataclasses.replace(RES, padding="circular"), seed=1))
    np.testing.assert_allclose(circ(shift(x), t), shift(circ(x, t)), atol=1e-5)
    # zero padding breaks it at the borders: the comparison can fail
    zeros = jitted(nets.build(RES, seed=1))
    assert float(jnp.max(jnp.abs(zeros(shift(x), t) - shift(zeros(x, t))))) > 1e-3


def test_circular_unet_is_equivariant_to_shifts_by_the_pooling_stride():
    f = jitted(nets.build(UNET_CIRC, seed=2))  # GroupNorm statistics are shift-invariant too
    x, t = rand((3, 8, 8, 3)), jnp.array([0.2, 0.5, 0.9])
    shift = lambda v: jnp.roll(v, (2, 4), axis=(1, 2))  # noqa: E731  (multiples of the 2x2 pool)
    np.testing.assert_allclose(f(shift(x), t), shift(f(x, t)), atol=1e-5)


def test_resnet_gradient_vanishes_outside_the_receptive_field():
    model = nets.build(RES, seed=3)
    graphdef, state = nnx.split(model)
    x, t = rand((1, 12, 12, 1), seed=4), jnp.array([0.4])
    i, j = 6, 5
    grad = jax.jit(jax.grad(lambda x: nnx.merge(graphdef, state)(x, t)[0, i, j, 0]))(x)[0, :, :, 0]
    r = RES.receptive_field // 2
    assert r == 4  # up-projection, 2 residual convs, down-projection: four 3x3 convs
    rows, cols = np.nonzero(np.abs(np.asarray(grad)) > 0)
    # the support is exactly the (2r+1)^2 window: nothing outside, something on its edge
    assert rows.min() == i - r and rows.max() == i + r
    assert cols.min() == j - r and cols.max() == j + r


def test_conditional_network_depends_on_the_label():
    cfg = dataclasses.replace(RES, conditional=True, num_classes=3)
    model = nets.build(cfg)
    f = jitted(model)
    x, t = rand((2, 12, 12, 1)), jnp.array([0.5, 0.5])
    a, b = f(x, t, jnp.array([0, 0])), f(x, t, jnp.array([1, 2]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    with pytest.raises(ValueError, match="label: this network is class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="label: this network is unconditional"):
        nets.build(RES)(x, t, jnp.array([0, 1]))


def test_call_checks_the_image_shape():
    with pytest.raises(ValueError, match=r"x_t: expected shape \[B, 12, 12, 1\]"):
        nets.build(RES)(jnp.zeros((1, 8, 8, 1)), jnp.array([0.5]))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"arch": "vit"}, "arch: unknown architecture 'vit'"),
        ({"kernel_size": 4}, "kernel_size: must be odd"),
        ({"out_kernel_size": 2}, "out_kernel_size: must be odd"),
        ({"padding": "reflect"}, "padding: must be one of zeros, circular"),
        ({"norm": "batch"}, "norm: must be None or 'group'"),
        ({"width": 12}, "width: .* multiple of 8"),
        ({"width": 8}, "width: .* at least 16"),
        ({"conditional": True}, "num_classes: required"),
        ({"channels": 0}, "channels: expected a positive int"),
        ({"arch": "unet", "image_size": 10, "depth": 3}, "image_size: .* divisible by 4"),
        ({"arch": "unet", "depth": 1}, "depth: the UNet needs at least 2 levels"),
        ({"emb_dim": 32}, "emb_dim: .* must equal width"),
        ({"arch": "ddpm-unet", "depth": None}, r"width: .*GroupNorm\(32\).* got \[16\]"),
        ({"arch": "ddpm-unet", "width": 32, "depth": None, "ch_mult": (1, 2), "attn": (2,)},
         r"attn: level indices must .* lie in \[0, 2\)"),
        ({"arch": "ddpm-unet", "width": 32, "depth": None, "padding": "circular"}, "padding: the DDPM UNet has zero"),
        ({"arch": "ddpm-unet", "width": 32, "depth": None, "dropout": 1.0}, r"dropout: expected a rate in \[0, 1\)"),
        ({"arch": "ddpm-unet", "width": 32, "depth": None, "image_size": 12}, "image_size: .* divisible by 8"),
        ({"mid_attn": False}, "mid_attn, dropout: options of arch='ddpm-unet' only"),
        ({"arch": "ddpm-unet", "width": 32, "depth": None, "mid_attn": 0}, "mid_attn: expected a bool"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, msg):
    base = {"image_size": 8, "width": 16, "depth": 2}
    with pytest.raises(ValueError, match=msg):
        nets.NetConfig(**{**base, **kwargs})


def test_config_round_trips_through_a_dict():
    cfg = nets.NetConfig(arch="unet", channels=3, image_size=16, conditional=True, num_classes=10)
    assert nets.NetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.features == (64, 128, 256) and cfg.emb_dim == 256
    with pytest.raises(ValueError, match="unknown network option"):
        nets.NetConfig.from_dict({**cfg.to_dict(), "attention_heads": 4})
    with pytest.raises(ValueError, match="options of arch='ddpm-unet' only"):
        nets.NetConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    ddpm = nets.NetConfig(arch="ddpm-unet", image_size=16, width=32, ch_mult=(1, 2), attn=(1,), dropout=0.1)
    assert nets.NetConfig.from_dict(json.loads(json.dumps(ddpm.to_dict()))) == ddpm  # JSON lists back to tuples
    assert (ddpm.depth, ddpm.emb_dim, ddpm.features) == (2, 128, (32, 64))


def test_presets_are_the_papers_networks():
    # every published scale schedule has the network it was calibrated against
    assert set(ej.presets.PAPER_SCALES) <= set(nets.PRESETS)
    for name, p in nets.PRESETS.items():
        assert p.dataset in ej.data.DATASETS and p.net.image_size == 32 and p.net.padding in name.lower()
        assert p.net.conditional == name.endswith("_conditional")
        assert p.net.channels == (3 if p.dataset in ("cifar10", "celeb_a") else 1)
        assert p.net.arch == ("resnet" if "_ResNet_" in name else "unet")
    r, u = nets.preset("MNIST_ResNet_zeros").net, nets.preset("CIFAR10_UNet_zeros_conditional").net
    assert (r.width, r.depth, r.kernel_size, r.out_kernel_size, r.norm) == (256, 8, 3, 3, None)
    assert (u.features, u.emb_dim, u.channels, u.num_classes) == ((64, 128, 256), 256, 3, 10)
    # parameter count of the MNIST ResNet from its definition, counted on an abstract model
    w, k, c, layers = 256, 3, 1, 8
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    mlp = w * w + w + 2 * w  # Linear + GroupNorm(scale, bias)
    want = conv(c, w, k) + layers * (mlp + conv(w, w, k)) + mlp + conv(w, c, 3)
    assert nets.count_params(nnx.eval_shape(lambda: nets.build(r, rngs=nnx.Rngs(0)))) == want
    with pytest.raises(ValueError, match="preset: unknown network preset"):
        nets.preset("MNIST_VAE")


def test_initialization_follows_pytorch_defaults():
    cfg = nets.NetConfig(image_size=8, width=16, depth=1, conditional=True, num_classes=50)
    model = nets.build(cfg, seed=5)
    kernel = np.asarray(model.layers[0].conv.kernel[...])
    bound = 1 / math.sqrt(16 * 9)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert abs(float(np.std(np.asarray(model.embed.classes.embedding[...]))) - 1.0) < 0.1
    # the same seed gives the same weights, another seed others
    same, other = nets.build(cfg, seed=5), nets.build(cfg, seed=6)
    assert np.array_equal(same.layers[0].conv.kernel[...], kernel)
    assert not np.array_equal(other.layers[0].conv.kernel[...], kernel)


def test_attention_weights_and_the_attention_free_control():
    """The DDPM UNet's attention layers report row-stochastic weights over their grids; with attn=()
    and mid_attn=False the same UNet has no attention at all (and fewer parameters)."""
    kw = {"arch": "ddpm-unet", "image_size": 8, "width": 32, "ch_mult": (1, 2), "num_res_blocks": 1}
    with_attn, without = nets.NetConfig(**kw, attn=(0,)), nets.NetConfig(**kw, mid_attn=False)
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([0.3, 0.8])
    model, control = nets.build(with_attn), nets.build(without)
    maps = nets.attention_weights(model, x, t)
    assert [(h, w) for h, w, _ in maps] == [(8, 8), (4, 4), (8, 8), (8, 8)]
    for h, w, a in maps:
        assert a.shape == (2, h * w, h * w)
        np.testing.assert_allclose(jnp.sum(a, -1), 1.0, atol=1e-5)
    assert not any(isinstance(m, nets._Attention) for _, m in nnx.iter_modules(control))
    assert nets.count_params(control) < nets.count_params(model)
    with pytest.raises(TypeError, match="eagerly"):
        jax.jit(lambda x: nets.attention_weights(model, x, t)[0][2])(x)
