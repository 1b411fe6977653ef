"""Scale-out: banks sharded over 8 forced host devices equal one device; compiled temporaries of a
step do not grow with the training set (the bank is streamed in chunks)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej

SHARDED = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np, jax
    import ellsjax as ej
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (11, 6, 6, 2)).astype(np.float32)
    imgs[:, :2, :2] = -1.0  # duplicates, so banks have counts
    labels = np.array([0, 1, 0, 1, 0, 1, 1, 2, 2, 2, 0])
    x = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    out = {}
    for name in ["is", "ls", "els", "bbels"]:
        for cond in [False, True]:
            m = ej.machines.build(name, imgs, labels if cond else None)
            lab = np.array([1, 0, 2]) if cond else None
            k = ej.denoiser.scale_for(m, 3)  # IS has no scale
            sm = m.shard().prepare((k,), conditional=cond)
            one = m.denoise(x, [0.5, 0.7, 0.9], scale=k, label=lab)
            many = sm.denoise(x, [0.5, 0.7, 0.9], scale=k, label=lab)
            banks = next(iter(sm.banks.values()))
            out[f"{name}/{cond}"] = {
                "diff": float(np.abs(np.asarray(one) - np.asarray(many)).max()),
                "devices": min(len(gb.keys_t.sharding.device_set) for gb in banks.values()),
            }
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_banks_equal_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert len(res) == 8
    for key, v in res.items():
        assert v["devices"] == 8, key
        assert v["diff"] <= 1e-6, (key, v["diff"])


def test_shard_argument_checks():
    imgs = np.zeros((4, 6, 6, 1), np.float32)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match="axis: 'bank' is not an axis"):
        ej.machines.els(imgs).shard(mesh)
    sm = ej.machines.els(imgs).shard(mesh, axis="data")
    assert sm.mesh is mesh and isinstance(sm.search, ej.machines.Exact)
    with pytest.raises(ValueError, match="search, placement: TopK search is not combined with Sharded"):
        sm.with_search(ej.machines.TopK(1e-3))
    with pytest.raises(ValueError, match=r"search, placement: Pruned\(tolerance=0.001\) is not combined with Sharded"):
        ej.machines.els(imgs).with_search(ej.machines.Pruned(1e-3)).shard(mesh, axis="data")
    assert sm.with_search(ej.machines.Pruned(0.0)).search.tolerance == 0.0  # exact pruning shards
    with pytest.raises(ValueError, match="no prepared bank for scale 3"):
        sm.denoise(imgs[:1], 0.5, scale=3)


@pytest.mark.parametrize("kind,prebuilt", [("els", True), ("els", False), ("bbels", True), ("is", False)])
def test_step_temporaries_do_not_grow_with_the_training_set(kind, prebuilt):
    rng = np.random.default_rng(0)
    temps = []
    for n in [16, 64]:
        imgs = rng.uniform(-1, 1, (n, 10, 10, 1)).astype(np.float32)
        m = ej.machines.build(kind, imgs, chunk_size=4, bank_budget=None if prebuilt else 1)
        k = ej.denoiser.scale_for(m, 5)
        m = m.prepare((k,))
        assert bool(m.banks) == prebuilt
        x = jnp.zeros((2, 10, 10, 1))
        step = jax.jit(lambda mm, xx: mm._denoise(xx, jnp.full((2,), 0.5), None, k))
        mem = step.lower(m, x).compile().memory_analysis()
        if mem is None:
            pytest.skip("memory analysis unavailable on this backend")
        temps.append(mem.temp_size_in_bytes)
    # 4x the images, same chunk: temporaries stay put (up to small bookkeeping)
    assert temps[1] <= temps[0] * 1.1 + 4096, temps
