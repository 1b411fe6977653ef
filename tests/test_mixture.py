"""The local/global mixture machine and the calibration of its weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import calibration as cal


@pytest.fixture(scope="module")
def setup():
    imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    local, glob = ej.machines.bbels(imgs), ej.machines.ideal(imgs)
    noise = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    return imgs, local, glob, ej.machines.mixture(local, glob), noise


def test_mixture_is_the_convex_combination_and_its_limits(setup):
    imgs, local, glob, m, _ = setup
    x, t = imgs[:2] * 0.6 + 0.3, jnp.array([0.7, 0.3])
    lo, gl = np.asarray(local.denoise(x, t, scale=5)), np.asarray(glob.denoise(x, t))
    for w in (0.0, 0.35, 1.0):
        np.testing.assert_allclose(m.denoise(x, t, scale=(5, w)), (1 - w) * lo + w * gl, atol=2e-6)
    # the weight is an argument of the compiled call: jit with a traced w and jax.grad agree with the formula
    f = jax.jit(lambda w: m.denoise(x, t, scale=(5, w)))
    np.testing.assert_allclose(f(jnp.float32(0.35)), 0.65 * lo + 0.35 * gl, atol=2e-6)
    g = jax.grad(lambda w: jnp.sum(m.denoise(x, t, scale=(5, w))))(jnp.float32(0.2))
    np.testing.assert_allclose(g, np.sum(gl - lo), rtol=1e-4)


def test_mixture_refuses_bad_scales_and_parts(setup):
    imgs, local, glob, m, _ = setup
    x = imgs[:1]
    with pytest.raises(ValueError, match="weight w must lie in"):
        m.denoise(x, 0.5, scale=(3, 1.5))
    with pytest.raises(TypeError, match="pair"):
        m.denoise(x, 0.5, scale=3)
    with pytest.raises(ValueError, match="odd"):
        m.denoise(x, 0.5, scale=(4, 0.5))
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="weight w must lie in"):  # in a user jit
        jax.block_until_ready(jax.jit(lambda w: m.denoise(x, 0.5, scale=(3, w)))(jnp.float32(-0.5)))
    with pytest.raises(TypeError, match="local"):
        ej.machines.mixture(glob, glob)
    with pytest.raises(TypeError, match="global_"):
        ej.machines.mixture(local, local)
    with pytest.raises(ValueError, match="images"):
        ej.machines.mixture(local, ej.machines.ideal(imgs[:, :4, :4]))


def test_calibration_recovers_known_weights_and_samples_with_them(setup):
    imgs, local, glob, m, noise = setup
    ts = [0.8, 0.5, 0.2, 0.0]
    truth = ((5, 0.6), (3, 0.25), (3, 0.0))
    res = cal.differentiable_calibrate(m, m, noise, ts, init=[(k, 0.1) for k, _ in truth], network_scales=truth)
    assert isinstance(res, cal.MixtureCalibration) and res.local_scales == (5, 3, 3)
    # per step the objective is a quadratic in w: the Hermite step of the line search is exact
    np.testing.assert_allclose(res.weights, [w for _, w in truth], atol=2e-3)
    assert np.all(res.step_loss <= res.step_loss_local + 1e-9) and res.step_loss[0] < 1e-4 < res.step_loss_local[0]
    # Adam, projected onto [0, 1], moves the same way and never leaves the interval
    adam = cal.differentiable_calibrate(m, m, noise, ts, init=[(k, 0.5) for k, _ in truth], network_scales=truth,
                                        optimizer="adam", iterations=4, learning_rate=0.1)
    assert all(0.0 <= w <= 1.0 for w in adam.weights) and adam.losses[-1] < adam.losses[0]
    out = ej.samplers.ddim(m, noise, ts, scales=res.scales)
    assert out.shape == noise.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="per_step"):
        cal.differentiable_calibrate(m, m, noise, ts, init=list(truth), network_scales=truth, curve="quadratic")
    with pytest.raises(ValueError, match="pair per step"):
        cal.differentiable_calibrate(m, m, noise, ts, init=0.5, network_scales=truth)
