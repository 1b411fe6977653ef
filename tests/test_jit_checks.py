"""Value checks that hold under ``jax.jit``, ``vmap`` and ``grad`` with the eager messages; ``t`` as a
float, 0-d or ``[B]`` array (never a string); a denoiser without a scale refuses any."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import ellsjax as ej
from ellsjax._checks import fail, labels_present, runtime_check
from ellsjax.denoiser import Denoiser, check_scale_value, scale_for
from tests.conftest import unchecked_shapes

#: What a runtime check raises: the first run of a compiled program re-raises the host check's own
#: exception; later runs raise jax's runtime error whose text ends with it (same message).
RUNTIME = (ValueError, jax.errors.JaxRuntimeError)

IMGS = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
LABELS = np.array([0, 0, 1, 1, 3, 3])  # class 2 has no images
X = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)


def eager_message(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def assert_same_error(eager, jitted, *args):
    """``jitted(*args)`` raises (when it runs) the message that ``eager(*args)`` raises."""
    msg = eager_message(eager, *args)
    with pytest.raises(RUNTIME, match=re.escape(msg)):
        jax.block_until_ready(jitted(*args))


@pytest.fixture(scope="module")
def machine():
    return ej.machines.els(IMGS, LABELS).prepare((3,), conditional=True)


def test_denoise_checks_values_inside_jit_with_the_eager_messages(machine):
    eager = lambda x, t, lab: machine.denoise(x, t, scale=3, label=lab)  # noqa: E731
    jitted = jax.jit(eager)  # one program (x [2,8,8,1], t [2], label [2]) for every case below
    good = (X, np.array([0.5, 0.2], np.float32), np.array([0, 3]))
    np.testing.assert_allclose(jitted(*good), eager(*good), atol=1e-6)
    nan_x = X.copy()
    nan_x[1, 2, 3, 0] = np.nan
    for x, t, lab in [
        (X, [0.5, 1.5], [0, 3]),  # t outside [0, 1]
        (X, [-0.1, 0.5], [0, 3]),
        (X, [np.nan, 0.5], [0, 3]),  # non-finite t
        (nan_x, [0.5, 0.5], [0, 3]),  # NaN in x_t
        (X, [0.5, 0.5], [0, 2]),  # a class with no images
        (X, [0.5, 0.5], [7, 1]),  # a class id out of range
        (X, [0.5, 0.5], [-1, 1]),
    ]:
        assert_same_error(eager, jitted, x, np.asarray(t, np.float32), np.asarray(lab, np.int32))


def test_score_and_eps_at_zero_noise_raise_inside_jit(machine):
    for name in ("score", "eps"):
        eager = lambda x, t: getattr(machine, name)(x, t, scale=3, label=0)  # noqa: E731
        assert_same_error(eager, jax.jit(eager), X, np.float32(0.0))


def test_checks_hold_under_vmap_and_are_invisible_to_grad(machine):
    f = lambda t: machine.denoise(X, t, scale=3, label=1)  # noqa: E731
    out = jax.vmap(f)(jnp.array([0.3, 0.6]))
    np.testing.assert_allclose(out[1], f(0.6), atol=1e-6)
    with pytest.raises(RUNTIME, match=re.escape("t: times must lie in [0, 1], got min 1.5, max 1.5")):
        jax.block_until_ready(jax.vmap(f)(jnp.array([0.3, 1.5])))
    # the guard's derivative is its argument's: d/dx of a guarded x² is 2x, with or without jit
    guarded = lambda x: (runtime_check(x, x > 10, fail("x: too large")) ** 2).sum()  # noqa: E731
    x = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(jax.grad(guarded)(x), 2 * x)
    np.testing.assert_allclose(jax.jit(jax.grad(guarded))(x), 2 * x)
    with pytest.raises(RUNTIME, match="x: too large"):
        jax.block_until_ready(jax.jit(jax.grad(guarded))(x + 20))


def test_sampler_time_grid_and_labels_are_checked_inside_jit(machine):
    eager = lambda ts, lab: ej.samplers.ddim(machine, X, ts, scales=(3, 3), label=lab)  # noqa: E731
    jitted = jax.jit(eager)  # one program for every grid and label below
    assert np.all(np.isfinite(jitted(np.array([0.6, 0.3, 0.0], np.float32), np.array([0, 1]))))
    for ts, lab in [([0.3, 0.6, 0.0], [0, 1]), ([1.5, 0.3, 0.0], [0, 1]), ([0.6, 0.0, 0.0], [0, 1]),
                    ([0.6, 0.3, 0.0], [2, 1])]:
        assert_same_error(eager, jitted, np.asarray(ts, np.float32), np.asarray(lab, np.int32))


def test_checks_can_be_left_out_of_a_program_for_jax_export(machine):
    program = lambda: jax.jit(lambda x, t: machine.denoise(x, t, scale=3, label=1))  # noqa: E731
    t = jnp.array([0.5, 0.2])
    with pytest.raises(NotImplementedError, match="host_callbacks"):  # jax.export cannot serialize the callback
        jax.export.export(program())(X, t)
    with ej.denoiser.runtime_checks(False):  # acts while tracing: a fresh function
        exported = jax.export.export(program())(X, t)
    np.testing.assert_allclose(exported.call(X, t), program()(X, t), atol=1e-6)


class _Toy(Denoiser):
    """The smallest conditional denoiser: ``x̂0 = label/10`` for labels 0 and 1; no device-side label
    test (the default :meth:`Denoiser._label_ok`) unless ``device_test``."""

    scale_kind = "none"

    def __init__(self, device_test: bool):
        self.schedule = ej.schedules.cosine_legacy()
        self.device_test = device_test

    image_shape = property(lambda self: (8, 8, 1))
    conditional = property(lambda self: True)

    def check_label(self, label: Any) -> None:
        if label is None or np.any((np.asarray(label) < 0) | (np.asarray(label) > 1)):
            raise ValueError(f"label: toy classes are 0 and 1, got {label}")

    def _label_ok(self, label):
        return ((label >= 0) & (label <= 1)) if self.device_test else None

    def _denoise(self, x_t, t, label, scale):
        return jnp.zeros_like(x_t) + (label / 10.0)[:, None, None, None]


jax.tree_util.register_pytree_node(_Toy, lambda d: ((), d.device_test), lambda aux, _: _Toy(aux))


@pytest.mark.parametrize("device_test", [False, True])
def test_label_hook_default_checks_on_the_host_and_override_on_the_device(device_test):
    toy = _Toy(device_test)
    eager = lambda lab: toy.denoise(X, 0.5, label=lab)  # noqa: E731
    jitted = jax.jit(eager)
    np.testing.assert_allclose(jitted(jnp.array([1, 0])), eager(np.array([1, 0])))
    assert_same_error(eager, jitted, jnp.array([1, 5]))


def test_labels_present_is_the_device_half_of_a_machines_label_check():
    m = ej.machines.els(IMGS, LABELS)  # classes 0, 1, 3 have images; 2 has none
    labels = [0, 2, 7, -1, 1, 3]
    ok = jax.jit(labels_present, static_argnums=1)(jnp.array(labels), m.class_sizes).tolist()
    assert ok == [True, False, False, False, True, True]
    for lab, good in zip(labels, ok):  # the eager check agrees label by label
        try:
            m.check_label(np.array([lab]))
        except ValueError:
            assert not good, lab
        else:
            assert good, lab


@pytest.mark.parametrize("t", ["0.5", b"0.5", True, ["0.5", "0.5"], None, object()])
def test_t_must_be_a_number_or_array_of_times(t, machine):
    with pytest.raises(TypeError, match=r"^t: expected a real number or array of times"):
        machine.denoise(X, t, scale=3, label=0)


def test_t_as_float_0d_or_per_image(machine):
    want = machine.denoise(X, np.array([0.5, 0.5], np.float32), scale=3, label=0)
    for t in (0.5, np.float32(0.5), jnp.array(0.5), jnp.array([0.5, 0.5]), [0.5, 0.5]):
        np.testing.assert_allclose(machine.denoise(X, t, scale=3, label=0), want, atol=1e-6)
    with pytest.raises(ValueError, match=r"t: expected a scalar or shape \[2\], got shape \(3,\)"):
        jax.jit(lambda t: machine.denoise(X, t, scale=3, label=0))(jnp.zeros(3))


def test_a_denoiser_without_a_scale_refuses_any():
    assert check_scale_value("none", None) is None
    for bad in (3, 4, 1.5, "3"):
        with pytest.raises(ValueError, match="scale: this denoiser has no scale; pass scale=None"):
            check_scale_value("none", bad)
    ideal = ej.machines.ideal(IMGS)
    with pytest.raises(ValueError, match="scale: this denoiser has no scale"):
        ideal.denoise(X, 0.5, scale=3)
    with pytest.raises(ValueError, match="scales: IdealScore has no scale; pass scales=None"):
        ej.samplers.ddim(ideal, X, [0.5, 0.2, 0.0], scales=[3, 3])
    assert scale_for(ideal, (3, 3)) is None
    els = ej.machines.els(IMGS)
    assert scale_for(els, (3, 3)) == (3, 3)


@pytest.mark.skipif(os.environ.get("ELLSJAX_SHAPECHECK", "1") == "0", reason="shape checks turned off")
def test_the_suite_checks_shape_annotations():
    # tests/conftest.py wraps ellsjax in jaxtyping + beartype: a dimension bound twice must agree
    from ellsjax import kernel

    kernel.make_bank(np.zeros((1, 4, 3), np.float32), np.zeros((1, 4, 1), np.float32))
    with pytest.raises(jaxtyping.TypeCheckError, match="make_bank"):
        kernel.make_bank(np.zeros((1, 4, 3), np.float32), np.zeros((1, 5, 1), np.float32))  # n = 4 and 5
    with unchecked_shapes():  # off for a test of the library's own errors (the kernel trusts its callers)
        kernel.make_bank(np.zeros((1, 4, 3), np.float32), np.zeros((1, 5, 1), np.float32))
