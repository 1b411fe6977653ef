"""Trained networks as denoisers: the x̂0/ε̂/score algebra, the sampler, labels, loading errors, the CLI."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli, models, nets
from tests.conftest import tiny_net, tiny_train_config

NET = tiny_net()
# the optimizer settings and batch shape of tests/test_training.py: one compiled train step for both
CFG = tiny_train_config()


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def noisy(b=3, seed=0, shape=(12, 12, 1)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, *shape)), jnp.float32)


@jax.jit
def parts(d, x, t):
    """The network's own ε̂ and the denoiser's pure ε̂, x̂0 and score, in one program."""
    return d.module()(x, t, None), d._eps(x, t, None, None), d._denoise(x, t, None, None), d._score(x, t, None, None)


def test_denoise_eps_and_score_follow_from_the_network(run):
    d = models.load(run)
    assert isinstance(d, ej.Denoiser) and d.image_shape == (12, 12, 1) and d.weights == "ema"
    x, t = noisy(), jnp.array([0.1, 0.5, 0.9])
    eps, eps_d, x0, score = parts(d, x, t)
    a, s = (np.asarray(v)[:, None, None, None] for v in d.schedule(t))
    np.testing.assert_array_equal(eps_d, eps)
    np.testing.assert_allclose(x0, (x - s * eps) / a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score, -eps / s, rtol=1e-5, atol=1e-5)
    # the generic identity of the Denoiser interface holds too, and the checked method agrees
    np.testing.assert_allclose(score, (a * x0 - x) / s**2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.denoise(x, t), x0, rtol=1e-6, atol=1e-6)


def test_ema_and_raw_weights(run):
    ema, raw = models.load(run), models.load(run, ema=False)
    assert (ema.weights, raw.weights) == ("ema", "params")
    assert not all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(ema.state), jax.tree.leaves(raw.state)))
    first = models.load(run, ema=False, step=3)
    assert all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(first.state), jax.tree.leaves(raw.state)))


def test_ddim_samples_a_network_like_a_machine(run):
    d = models.load(run)
    x, ts = noisy(3, seed=1), [0.9, 0.6, 0.3, 0.0]
    out = ej.samplers.ddim(d, x, ts)
    # a network has no scale: it refuses a machine's schedule (scale_for gives it None) ...
    with pytest.raises(ValueError, match="scales: NetworkDenoiser has no scale; pass scales=None"):
        ej.samplers.ddim(d, x, ts, scales=[7, 5, 3])
    assert ej.denoiser.scale_for(d, [7, 5, 3]) is None
    # ... and placeholder scales for a network are no scales: the same compiled program
    assert ej.samplers.check_scales([None] * 3, d, 3) is None
    # the same DDIM steps written out with the network's ε̂
    y = np.asarray(x)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        eps = np.asarray(parts(d, jnp.asarray(y), jnp.full((3,), t0))[0])
        (a0, a1), (s0, s1) = (np.sqrt(np.asarray(v, np.float64)) for v in d.schedule.variances(np.array([t0, t1])))
        y = a1 * (y - s0 * eps) / a0 + s1 * eps
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)
    for scale in ("big", 3):
        with pytest.raises(ValueError, match="scale: this denoiser has no scale; pass scale=None"):
            d.denoise(x, 0.5, scale=scale)


def test_labels_of_conditional_and_unconditional_networks(run):
    cfg = dataclasses.replace(NET, conditional=True, num_classes=4)
    d = models.from_module(nets.build(cfg, seed=1))
    assert d.conditional and d.num_classes == 4
    x = noisy(2)
    a, b = d.denoise(x, 0.5, label=0), d.denoise(x, 0.5, label=jnp.array([1, 3]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    with pytest.raises(ValueError, match="label: this network is class-conditional"):
        d.denoise(x, 0.5)
    with pytest.raises(ValueError, match=r"label: class ids must lie in \[0, 4\), got \[7\]"):
        d.denoise(x, 0.5, label=7)
    with pytest.raises(ValueError, match="label: this network is unconditional"):
        models.load(run).denoise(x, 0.5, label=1)
    # inside the user's jit too (one program; a(t) = 0 likewise: tests/test_jit_checks.py's pattern)
    jitted = jax.jit(lambda lab: d.denoise(x, 0.5, label=lab))
    np.testing.assert_allclose(jitted(jnp.array([1, 3])), b, atol=1e-5)
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=r"label: class ids must lie in \[0, 4\), got \[7\]"):
        jax.block_until_ready(jitted(jnp.array([1, 7])))


def test_zero_signal_makes_x0_undefined():
    # Nichol & Dhariwal's cosine has a(1) = 0: x̂0 = (x_t − s·ε̂)/a is undefined there
    d = models.from_module(nets.build(NET), schedule="cosine")
    for denoise in (d.denoise, jax.jit(d.denoise)):  # eagerly and inside a jit
        with pytest.raises((ValueError, jax.errors.JaxRuntimeError),
                           match=r"t: x̂0 .* undefined where the signal level a\(t\) is 0"):
            jax.block_until_ready(denoise(noisy(1), jnp.array([1.0])))
    # a sampler starting there is refused up front, not after a compile that returns inf
    with pytest.raises(ValueError, match=r"ts: this denoiser's x̂0 is undefined .* t = \[1.0\]"):
        ej.samplers.ddim(d, noisy(1), [1.0, 0.5, 0.0])
    # a machine's softmax is defined at a = 0: the same grid is fine for it
    imgs = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 12, 12, 1)), jnp.float32)
    m = ej.machines.ideal(imgs, schedule="cosine")
    assert np.all(np.isfinite(ej.samplers.ddim(m, noisy(1), [1.0, 0.5, 0.0])))


def test_missing_or_corrupt_runs_are_clear_errors(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="dir: no such directory: .*nowhere"):
        models.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"holds no trained network \(no config.json\)"):
        models.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"step: no checkpoint for step 7 .* available: \[3\]"):
        models.load(run, step=7)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for f in (broken / "checkpoints" / "3" / "ema").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint: cannot read .*broken/checkpoints/3 .*corrupt"):
        models.load(broken)
    shutil.rmtree(broken / "checkpoints")
    with pytest.raises(FileNotFoundError, match="dir: no checkpoint in .*broken/checkpoints"):
        models.load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="dir: cannot read .*config.json"):
        models.load(broken)


def test_cli_samples_from_a_trained_network(run, tmp_path):
    out = tmp_path / "samples"
    # 3 samples, 4 times: the shapes of the ddim test above, so the compiled sampler is reused
    assert cli.main(["sample", "--model", str(run), "--num-samples", "3", "--steps", "4", "--out", str(out),
                     "--no-progress", "--seed", "2"]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (3, 12, 12, 1) and np.all(np.isfinite(z["samples"]))
        np.testing.assert_allclose(z["ts"], [0.75, 0.5, 0.25, 0.0], atol=1e-6)
        x_start, samples = z["x_start"], z["samples"]
    # the same starting noise as the machines get for the same seed, so outputs compare one to one
    np.testing.assert_array_equal(x_start, jax.random.normal(jax.random.key(2), (3, 12, 12, 1)))
    np.testing.assert_array_equal(samples, ej.samplers.ddim(models.load(run), x_start, [0.75, 0.5, 0.25, 0.0]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == str(run) and cfg["net"]["arch"] == "resnet" and cfg["weights"] == "ema"
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no such directory"):
        cli.main(["sample", "--model", str(tmp_path / "none"), "--out", str(out), "--no-progress"])
