"""Capacity plans on CPU: loop-aware counts against the formula, the memory model, the CLI table, and a
DDIM program exported with the machine as an argument that loads and runs with the same result."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli
from ellsjax import plan as P


def test_counts_multiply_loop_bodies_by_their_trips():
    f = lambda a: jax.lax.scan(lambda c, _: (jnp.exp(c @ a), None), a, None, length=7)[0]  # noqa: E731
    c = P.count(f, jnp.ones((5, 5)))
    assert c.flops == 7 * 2 * 5 * 5 * 5 and c.exps == 7 * 25 and c.loops == (("scan", 7),) and c.exact
    w = P.count(lambda a: jax.lax.while_loop(lambda v: v.sum() < 10, lambda v: v @ a, a), jnp.eye(2))
    assert not w.exact and w.flops == 2 * 2 * 2 * 2  # a data-dependent loop: counted once, flagged


@pytest.mark.parametrize("n,chunk", [(12, 4), (64, None)])
def test_els_plan_counts_equal_the_formula(n, chunk):
    # a streamed ELS step: every (query pixel, bank patch) pair once, in chunks of whole images
    h, w, c, k = 10, 10, 1, 3
    m = ej.machines.els(jax.ShapeDtypeStruct((n, h, w, c), jnp.float32), chunk_size=chunk)
    cnt = P.count(lambda m, x, t: m._denoise(x, t, None, k), m, jax.ShapeDtypeStruct((2, h, w, c), jnp.float32),
                  jax.ShapeDtypeStruct((2,), jnp.float32))
    assert cnt.flops == P.els_flops(n, h, w, c, k, batch=2)
    core = 2 * h * w * k * k * c * n * (h - k + 1) * (w - k + 1) * 2  # the formula, B = 2
    assert cnt.flops == core * (k * k * c + 2 + c) / (k * k * c)  # + the augmented row and the sums
    if chunk:
        assert cnt.loops == (("scan", n // chunk - 1),)  # the first chunk seeds the running statistics


def test_plan_memory_model_and_roofline():
    p = P.plan("els", scale=3, images=(48, 10, 10, 1), batch=2, target="cpu", memory_budget=2**16)
    assert p.fits and p.argument_bytes >= 48 * 100 * 4 and p.temp_bytes > 0
    # the streamed pass's temporaries do not grow with N: the largest N is what memory leaves for pixels
    want = int((P.TARGETS["cpu"].memory - p.temp_bytes - 2 * 2 * (400 + 4)) // 400)
    assert p.max_images == want
    t = P.TARGETS["cpu"]
    assert p.roofline_s == max(p.flops / t.matmul, p.exps / t.exp, p.gemm_bytes / t.bandwidth)
    assert p.low_precision_s is not None and p.low_precision_s > 0
    with pytest.raises(ValueError, match="target: unknown target 'a100'"):
        P.plan("els", scale=3, images=(8, 10, 10, 1), target="a100")


def test_plan_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--machine", "bbels", "--scales", "3", "--dataset", "16,8,8,1", "--batch", "2",
                     "--target", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| bbels | 3 | 16 | 2 | cpu × 1 |" in text and "nothing ran on the device" in text
    rows = json.loads(out.read_text())
    assert rows[0]["machine"] == "bbels" and rows[0]["flops"] > 0
    with pytest.raises(SystemExit):
        cli.main(["plan", "--dataset", "12,12"])


def test_exported_ddim_with_the_machine_as_an_argument_round_trips():
    imgs = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    m = ej.machines.bbels(imgs).prepare((3,))
    ts = ej.schedules.paper_times(3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    want = ej.samplers.ddim(m, x, ts, scales=[3, 3])
    f = jax.jit(lambda m, x: ej.samplers.ddim(m, x, ts, scales=[3, 3], progress=True))
    with warnings.catch_warnings(record=True) as caught, ej.denoiser.runtime_checks(False):
        warnings.simplefilter("always")
        exported = jax.export.export(f, platforms=["cpu", "cuda", "rocm", "tpu"])(m, x)
    assert any("reports no progress" in str(w.message) for w in caught)
    back = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(back.call(m, x), want, atol=1e-6)
    # the banks are an argument, not constants of the module
    assert len(exported.mlir_module_serialized) < 300_000
