"""The machine API's design rules: strategies checked when combined, kinds with only the methods they
honour, a traced soft-window width, shape-only builds, budgets from the target platform, machines as
serializable export arguments, short reprs, no import circle, and no bank built just to be dropped."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax.machines import base
from ellsjax.machines.search import CertifiedSubset, Exact, Pruned, Sharded, TopK


def _imgs(n=12, h=8, w=8, c=1, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)


# ------------------------------------------------------------------------------------- imports
def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle_anywhere_in_the_package():
    # every import statement, module level or inside a function, as an edge between ellsjax modules
    root = pathlib.Path(ej.__file__).parent
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    src = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append(sub if sub in files else src)
            for t in targets:
                while t and t not in files:  # `import ellsjax.x.y` names the module itself
                    t = t.rpartition(".")[0]
                if t.startswith("ellsjax") and t != mod and t in files:
                    edges[mod].add(t)
    # a package's __init__ importing its own children is how packages work, not a circle
    for mod in files:
        if files[mod].name == "__init__.py":
            edges[mod] = {t for t in edges[mod] if not t.startswith(mod + ".")}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(files):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------------------------- strategies
def test_kinds_have_only_the_methods_they_honour():
    imgs = _imgs()
    for m in (ej.machines.wiener(imgs), ej.machines.cfdm(imgs, num_noise=2), ej.machines.pspc(imgs)):
        for method in ("with_search", "with_pruning", "shard", "denoise_with_bound"):
            assert not hasattr(m, method), (type(m).__name__, method)
    assert not hasattr(ej.machines.golddiff(imgs), "denoise_with_bound")  # bounds nothing
    for m in (ej.machines.els(imgs), ej.machines.ideal(imgs), ej.machines.local(imgs)):
        assert isinstance(m, ej.machines.BankMachine) and not hasattr(m, "with_pruning")
    soft = ej.machines.soft_els(imgs, support=3)
    # a width is not a size: the soft machine wraps the ELS machine instead of being one
    assert not isinstance(soft, ej.machines.EquivariantLocalScore) and soft.scale_kind == "width"
    assert isinstance(soft.hard, ej.machines.EquivariantLocalScore) and soft.hard.scale_kind == "size"
    assert not isinstance(ej.machines.golddiff(imgs), ej.machines.PCALocality)
    with pytest.raises(TypeError, match="abstract"):
        base.BankMachine(jnp.zeros((1, 4, 4, 1)), None)


def test_refusals_name_what_is_wrong():
    imgs = _imgs()
    m = ej.machines.els(imgs)
    with pytest.raises(ValueError, match="patch size must be a positive odd int, got 4"):
        m.prepare((4,))
    with pytest.raises(ValueError, match="conditional: this machine was built without labels"):
        m.prepare((3,), conditional=True)
    with pytest.raises(ValueError, match="scale: this denoiser has no scale"):
        ej.machines.ideal(imgs).prepare((3,))
    with pytest.raises(ValueError, match="rank: the covariance of 12 images of D = H·W·C = 64 values has at most 12"):
        ej.machines.wiener(imgs, rank=1000)
    with pytest.raises(ValueError, match="rank: .* at most 12"):
        ej.machines.pca(imgs, rank=13)
    soft = ej.machines.soft_els(imgs, support=3)
    with pytest.raises(ValueError, match="scale: the window width ℓ must be finite and positive"):
        soft.denoise_ell(imgs[:1], 0.5, None, -1.0)
    with pytest.raises(Exception, match="scale: the window width ℓ must be finite and positive"):
        jax.jit(lambda e: soft.denoise(imgs[:1], 0.5, scale=e))(-1.0).block_until_ready()
    with pytest.raises(ValueError, match="must be finite and positive"):
        soft.denoise(imgs[:1], 0.5, scale=-1.0)
    with pytest.raises(ValueError, match="search, placement: TopK search is not combined with Sharded"):
        m.with_search(TopK(1e-3)).shard(jax.make_mesh((1,), ("bank",)))
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        Sharded("cpu:0")


def test_topk_and_pruned_follow_one_rule_for_the_bound():
    # denoise returns exactly what denoise_with_bound returns, whatever the search
    imgs = _imgs(n=20)
    x = imgs[:2] * 0.9
    for search in (Exact(), TopK(1e-3, k=8), Pruned(0.0, block=16), Pruned(1e-3, block=16)):
        m = ej.machines.els(imgs).with_search(search).prepare((3,))
        x0, bound = m.denoise_with_bound(x, 0.05, scale=3)
        np.testing.assert_array_equal(np.asarray(m.denoise(x, 0.05, scale=3)), np.asarray(x0))
        assert float(np.max(bound)) <= getattr(search, "tolerance", 0.0) + 1e-9, search


# -------------------------------------------------------------------------------- soft window ℓ
def test_soft_width_is_traced_one_program_per_side_and_differentiable():
    imgs = _imgs(n=10)
    soft = ej.machines.soft_els(imgs, support=5, window="gaussian")
    x = imgs[:2] * 0.8 + 0.1
    ells = [0.6, 0.65, 0.7, 0.75]  # all on the side-5 window (2⌈3ℓ⌉+1 ≥ 5 → min(support, ·) = 5)
    assert {soft.window_size(e) for e in ells} == {5}
    from ellsjax import denoiser

    before = denoiser._jit_denoise._cache_size()
    outs = [soft.denoise(x, 0.4, scale=e) for e in ells]
    assert denoiser._jit_denoise._cache_size() - before == 1  # one program for the side, ℓ an argument
    assert float(jnp.abs(outs[0] - outs[-1]).max()) > 1e-4

    def loss(ell):
        return jnp.sum(soft.denoise(x, 0.4, scale=ell) ** 2)

    g = float(jax.grad(loss)(0.7))
    h = 1e-3
    fd = (float(loss(0.7 + h)) - float(loss(0.7 - h))) / (2 * h)
    assert abs(g - fd) <= 2e-2 * max(1.0, abs(fd)), (g, fd)
    # under jit the value cannot be read: the whole support, one program, same as ℓ's own side here
    jitted = jax.jit(lambda e: soft.denoise(x, 0.4, scale=e))(0.7)
    np.testing.assert_allclose(jitted, outs[2], atol=1e-5)
    # t as a float or [B] in the gradient entry as everywhere
    a = soft.denoise_ell(x, 0.4, None, 0.7, side=5)
    b = soft.denoise_ell(x, jnp.full((2,), 0.4), None, 0.7, side=5)
    np.testing.assert_allclose(a, b, atol=0)


# ------------------------------------------------------------------------- budgets and shapes
def test_budgets_follow_the_target_platform_not_the_host():
    imgs = _imgs()
    assert ej.machines.els(imgs).policy.platform == "cpu"  # where its arrays live
    tpu = ej.machines.els(imgs, platform="tpu")
    assert tpu.policy.budget == ej.machines.memory_budget_for("tpu") == 2**30
    assert tpu.policy.bank_bytes == ej.machines.bank_budget_for("tpu")
    assert ej.machines.els(imgs, platform="cuda").policy.platform == "gpu"
    with pytest.raises(ValueError, match="platform: must be one of cpu, gpu, tpu"):
        ej.machines.els(imgs, platform="npu")
    # the chunk plan follows the policy: the TPU program streams the bank in fewer, larger chunks
    x = imgs[:2]
    t = jnp.full((2,), 0.5)

    def loops(m):
        jaxpr = jax.make_jaxpr(lambda m, x: m._denoise(x, t, None, 3))(m, x)
        return str(jaxpr).count("while[") + str(jaxpr).count("scan[")

    cpu_small = ej.machines.els(imgs, memory_budget=4096)
    assert loops(cpu_small) >= 1
    # the host's default backend is never read while tracing
    real = jax.default_backend
    try:
        jax.default_backend = lambda: (_ for _ in ()).throw(AssertionError("default_backend read at trace time"))
        jax.make_jaxpr(lambda m, x: m._denoise(x, t, None, 3))(tpu, x)
    finally:
        jax.default_backend = real


def test_every_machine_builds_from_shapes_and_lowers():
    spec = jax.ShapeDtypeStruct((12, 8, 8, 1), jnp.float32)
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    for name in ej.machines.names():
        s = ej.machines.spec(name)
        if name == "golddiff":
            with pytest.raises(ValueError, match="pools the training images"):
                s.build(spec)
            continue
        m = s.build(spec)
        assert m.image_shape == (8, 8, 1), name
        scale = {"size": 3, "side": 3, "width": 1.0, "none": None}[m.scale_kind]
        # traced and lowered here; scripts/accelerator_check.py compiles every one for TPU and H100
        assert "func.func public @main" in jax.jit(lambda m, x, t: m._denoise(x, t, None, scale)).trace(
            m, x, t).lower().as_text(), name
        with pytest.raises(ValueError, match="built from shapes only"):
            m.denoise(np.zeros((2, 8, 8, 1), np.float32), 0.5, scale=scale)
    with pytest.raises(ValueError, match="no data to build banks"):
        ej.machines.els(spec).prepare((3,))


# ------------------------------------------------------------------------------- export, repr
@pytest.mark.parametrize("kind", ["pruned", "soft", "pca-certified"])
def test_export_with_the_machine_as_an_argument_round_trips(kind):
    imgs = _imgs(n=16)
    x = imgs[:2] * 0.7
    if kind == "pruned":  # prepared banks with their block index
        m, scale = ej.machines.els(imgs).with_search(Pruned(0.0, block=16)).prepare((3,)), 3
    elif kind == "soft":
        m, scale = ej.machines.soft_els(imgs, support=3).prepare((1.0,)), 1.0
    else:
        m, scale = ej.machines.pca(imgs).with_search(CertifiedSubset(1e-3, chunk=4)), None
    tt = jnp.full((2,), 0.3)
    f = jax.jit(lambda m, x: m._denoise(x, tt, None, scale))
    exported = jax.export.export(f)(m, x)
    back = jax.export.deserialize(exported.serialize())
    got = back.call(m, x)
    np.testing.assert_allclose(got, m.denoise(x, 0.3, scale=scale), atol=1e-5)
    # the machine is an argument: its training set is not a constant of the module
    assert len(exported.mlir_module_serialized) < 200_000
    assert back.in_tree == jax.tree.structure(((m, x), {}))


def test_sharded_machines_are_refused_by_serialization():
    imgs = _imgs()
    m = ej.machines.els(imgs).shard(jax.make_mesh((1,), ("bank",))).prepare((3,))
    exp = jax.export.export(jax.jit(lambda m, x: m._denoise(x, jnp.full((1,), 0.5), None, 3)))(m, imgs[:1])
    with pytest.raises(TypeError, match="a Sharded machine names devices"):
        exp.serialize()


def test_repr_shows_shapes_not_values():
    imgs = _imgs(n=40)
    r = repr(ej.machines.els(imgs).prepare((3,)))
    assert r.startswith("EquivariantLocalScore(pixels=float32[40, 64], hwc=(8, 8, 1)") and len(r) < 800, r
    assert "0." not in r.split("policy")[0]  # no pixel values
    assert "CertifiedSubset(tolerance=0.001" in repr(ej.machines.pca(imgs).with_search(CertifiedSubset(1e-3)))
    assert "hard=EquivariantLocalScore(pixels=float32[40, 64]" in repr(ej.machines.soft_els(imgs))


# --------------------------------------------------------------------------------- first calls
def test_unprepared_calls_stream_and_never_build_a_bank(monkeypatch):
    imgs = _imgs(n=16)
    x = imgs[:2] * 0.9
    prepared = {k: ej.machines.build(k, imgs).prepare((None if k == "is" else 3,)) for k in ("els", "bbels", "is", "ls")}
    want = {k: m.denoise(x, 0.3, scale=None if k == "is" else 3) for k, m in prepared.items()}

    def refuse(*a, **k):
        raise AssertionError("an unprepared call built a bank")

    monkeypatch.setattr(base.BankMachine, "_build_bank", refuse)
    for k, w in want.items():
        got = ej.machines.build(k, imgs).denoise(x, 0.3, scale=None if k == "is" else 3)
        np.testing.assert_allclose(got, w, atol=1e-5, err_msg=k)
