r"""Capacity plans: compile a machine's denoising step for a target without data, and predict what it
needs per device and how long it takes.

A plan builds the machine from ``jax.ShapeDtypeStruct`` images (no data), compiles one
``_denoise`` step for the target — this CPU, an H100, or a TPU topology, all compiled here without
the device (``jax.experimental.topologies``; TPU targets need ``pip install 'ellsjax[accelerators]'``)
— and reports per device:

* **memory**: the compiled program's arguments and temporaries (``memory_analysis()``), and the
  largest training set that fits (arguments grow with ``N``; the streamed pass's temporaries do not);
* **work**: loop-aware counts from the step's jaxpr (:func:`count`): GEMM FLOPs, transcendentals
  (``exp``) and GEMM bytes, each loop body multiplied by its trip count (XLA's own
  ``cost_analysis`` counts a loop body once);
* **a roofline time**: ``max(FLOPs/F, exps/E, bytes/B)`` from the target's published peak rates
  (:data:`TARGETS`, with their sources), and which bound binds.

It is a **prediction**: no accelerator ran it. The one check against a device is
``scripts/device_check.py --plan``, when one is lent.

For ELS at patch size ``k`` on ``N`` images ``H×W×C`` and one query image, the distance GEMM alone is
``2·H·W·k²·C·N·(H−k+1)(W−k+1)`` FLOPs; the kernel's augmented GEMM has ``k²C + 1`` rows and the
weighted sums ``1 + C`` more per pair (:func:`els_flops`).

Example:
    >>> p = plan("els", scale=5, images=(64, 12, 12, 1), batch=1, target="cpu")
    >>> p.flops == els_flops(64, 12, 12, 1, 5, batch=1)
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ellsjax import machines as _machines
from ellsjax.machines import _banks
from ellsjax.machines.search import Sharded

__all__ = ["Target", "TARGETS", "Counts", "Plan", "count", "plan", "els_flops", "compile_devices", "H100_CONFIG"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A device kind and its published peak rates (per device).

    Attributes:
        name: ``"cpu"``, ``"h100"``, ``"v5e"``, ``"v4"``, ``"v5p"``.
        platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
        memory: bytes of device memory usable by a program.
        matmul: float32 GEMM FLOP/s at the kernel's precision (``Precision.HIGHEST``: no TF32 on
            GPUs; several bfloat16 passes on TPUs).
        matmul_low: bfloat16 GEMM FLOP/s (the :class:`~ellsjax.machines.search.TopK` screen).
        exp: transcendental (``exp``) results per second.
        bandwidth: memory bandwidth, bytes/s.
        sources: where each number comes from (``assumed`` where nothing is published).
    """

    name: str
    platform: str
    memory: float
    matmul: float
    matmul_low: float
    exp: float
    bandwidth: float
    sources: str


#: The planning targets by name (``ellsjax plan --target NAME``).
TARGETS: dict[str, Target] = {
    "h100": Target(
        "h100", "gpu", memory=84_929_347_584, matmul=66.9e12, matmul_low=989.4e12 / 2,
        exp=16 * 132 * 1.98e9, bandwidth=3.35e12,
        sources="NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: FP32 66.9 TFLOPS, dense BF16 "
                "tensor 989.4/2 TFLOPS, HBM3 3.35 TB/s); CUDA C++ Programming Guide, arithmetic instruction "
                "throughput, compute capability 9.0: 16 exp2 results/clock/SM × 132 SMs × 1.98 GHz; memory: "
                "the device description of jax issue #28376"),
    "v5e": Target(
        "v5e", "tpu", memory=15.75 * 2**30, matmul=197e12 / 6, matmul_low=197e12, exp=1.5e12, bandwidth=819e9,
        sources="Google Cloud TPU v5e documentation (197 TFLOPS bf16, 16 GB HBM at 819 GB/s; 15.75 GiB usable "
                "per the compiler); JAX 'Matmul precision' guide: float32 (HIGHEST) on TPU = 6 bfloat16 passes; "
                "exp rate assumed (not published)"),
    "v4": Target(
        "v4", "tpu", memory=32 * 2**30, matmul=275e12 / 6, matmul_low=275e12, exp=2.0e12, bandwidth=1228e9,
        sources="Google Cloud TPU v4 documentation (275 TFLOPS bf16, 32 GiB HBM at 1228 GB/s); 6 passes for "
                "float32; exp rate assumed (not published)"),
    "v5p": Target(
        "v5p", "tpu", memory=95 * 2**30, matmul=459e12 / 6, matmul_low=459e12, exp=3.0e12, bandwidth=2765e9,
        sources="Google Cloud TPU v5p documentation (459 TFLOPS bf16, 95 GiB HBM at 2765 GB/s); 6 passes for "
                "float32; exp rate assumed (not published)"),
    "cpu": Target(
        "cpu", "cpu", memory=24e9, matmul=150e9, matmul_low=150e9, exp=2e9, bandwidth=20e9,
        sources="this development host (2-core AMD EPYC, 24 GB): float32 GEMM 88-190 GFLOP/s measured "
                "(../shared/notes/environment.md); exp and bandwidth rough figures for 2 cores"),
}

#: The H100 description the CUDA compiler needs without a device (``gpu_device_info`` text, from
#: jax issue #28376; ``../shared/notes/environment.md``).
H100_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 84929347584  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_TPU_TOPOLOGY = {  # chips -> topology name, per generation
    "v5e": {4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4", 64: "v5e:8x8", 256: "v5e:16x16"},
    "v4": {4: "v4:2x2x1", 8: "v4:2x2x2", 16: "v4:2x2x4"},
    "v5p": {4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"},
}


def compile_devices(target: str, count: int = 1) -> list:
    """``count`` devices to compile for: this host's CPU devices, or compile-only H100 / TPU devices
    (no accelerator needed; TPU targets need ``libtpu``, the H100 ``jax-cuda12-plugin``)."""
    t = _target(target)
    if t.platform == "cpu":
        devs = jax.devices("cpu")
        if count > len(devs):
            raise ValueError(f"devices: this host has {len(devs)} CPU devices, not {count} (set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={count})")
        return devs[:count]
    from jax.experimental import topologies

    if t.platform == "gpu":
        topo = topologies.get_topology_desc(platform="cuda", target_config=H100_CONFIG, topology=f"1x1x{count}")
        return list(topo.devices)[:count]
    table = _TPU_TOPOLOGY[t.name]
    chips = min((c for c in table if c >= count), default=None)
    if chips is None:
        raise ValueError(f"devices: no {t.name} topology of {count} chips here (known: {sorted(table)})")
    topo = topologies.get_topology_desc(topology_name=table[chips], platform="tpu")
    return list(topo.devices)[:count]


def _target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"target: unknown target {name!r}; known: {', '.join(TARGETS)}") from None


# ---------------------------------------------------------------------------------- counting
@dataclasses.dataclass(frozen=True)
class Counts:
    """Loop-aware counts of a program (per device for a ``shard_map`` body).

    Attributes:
        flops: GEMM FLOPs (``2·M·N·K`` per ``dot_general``).
        exps: transcendental results (``exp``, ``log``, ``logistic``, …).
        bytes: GEMM operand and result bytes (a lower bound on memory traffic: each read once).
        loops: ``(kind, trips)`` of every loop met, outermost first.
        exact: ``False`` where a ``while`` loop's trip count is data-dependent (counted once).
    """

    flops: float = 0.0
    exps: float = 0.0
    bytes: float = 0.0
    loops: tuple = ()
    exact: bool = True


_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "expm1", "logistic", "tanh", "sin", "cos", "erf", "pow"}


def count(fn_or_jaxpr: Any, *args: Any) -> Counts:
    """Loop-aware counts of ``fn(*args)`` (``args`` may be ``jax.ShapeDtypeStruct``), or of a
    (closed) jaxpr: every ``scan`` body times its length, ``cond`` its costliest branch, ``while``
    once (then :attr:`Counts.exact` is ``False``).

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=10)[0]
        >>> count(f, jnp.ones((4, 4))).flops == 10 * 2 * 4 * 4 * 4
        True
    """
    if not args and (hasattr(fn_or_jaxpr, "eqns") or hasattr(fn_or_jaxpr, "jaxpr")):
        jaxpr = fn_or_jaxpr
    else:
        jaxpr = jax.make_jaxpr(fn_or_jaxpr)(*args)
    acc = {"flops": 0.0, "exps": 0.0, "bytes": 0.0, "loops": [], "exact": True}
    _walk(getattr(jaxpr, "jaxpr", jaxpr), 1.0, acc)
    return Counts(acc["flops"], acc["exps"], acc["bytes"], tuple(acc["loops"]), acc["exact"])


def _size(aval) -> float:
    return float(np.prod(aval.shape)) if hasattr(aval, "shape") else 1.0


def _nbytes(aval) -> float:
    return _size(aval) * np.dtype(aval.dtype).itemsize if hasattr(aval, "dtype") else 0.0


def _subjaxprs(params) -> list:
    out = []
    for v in params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            j = getattr(item, "jaxpr", item)
            if hasattr(j, "eqns"):
                out.append(j)
    return out


def _walk(jaxpr, mult: float, acc: dict) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            k = float(np.prod([lhs.shape[d] for d in lc])) if lc else 1.0
            acc["flops"] += mult * 2.0 * _size(out) * k
            acc["bytes"] += mult * (_nbytes(lhs) + _nbytes(rhs) + _nbytes(out))
        elif name in _TRANSCENDENTAL:
            acc["exps"] += mult * _size(eqn.outvars[0].aval)
        elif name == "scan":
            n = int(eqn.params["length"])
            acc["loops"].append(("scan", n))
            _walk(eqn.params["jaxpr"].jaxpr, mult * n, acc)
        elif name == "while":
            acc["loops"].append(("while", None))
            acc["exact"] = False
            _walk(eqn.params["body_jaxpr"].jaxpr, mult, acc)
        elif name == "cond":
            best = None
            for br in eqn.params["branches"]:
                sub = {"flops": 0.0, "exps": 0.0, "bytes": 0.0, "loops": [], "exact": True}
                _walk(br.jaxpr, mult, sub)
                if best is None or sub["flops"] + sub["exps"] > best["flops"] + best["exps"]:
                    best = sub
            for key in ("flops", "exps", "bytes"):
                acc[key] += best[key]
            acc["loops"] += best["loops"]
            acc["exact"] &= best["exact"]
        else:
            for sub in _subjaxprs(eqn.params):
                _walk(sub, mult, acc)


def els_flops(n: int, h: int, w: int, c: int, k: int, *, batch: int = 1) -> float:
    """GEMM FLOPs of one exact ELS step over ``n`` training images (the kernel's augmented distance
    GEMM, ``k²C + 1`` rows, and its weighted sums, ``1 + C`` columns, for every query pixel and bank
    patch): ``2·B·H·W·(k²C + 1)·N·P + 2·B·H·W·(1 + C)·N·P``, ``P = (H−k+1)(W−k+1)`` — the issue's
    ``2·H·W·k²·C·N·(H−k+1)(W−k+1)`` plus the augmentation and the sums."""
    pairs = batch * h * w * n * (h - k + 1) * (w - k + 1)
    return 2.0 * pairs * (k * k * c + 1) + 2.0 * pairs * (1 + c)


# -------------------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Plan:
    """A capacity plan for one machine step on one target (per device). See :func:`plan`."""

    machine: str
    scale: Any
    images: tuple[int, int, int, int]
    batch: int
    target: str
    devices: int
    sharded: bool
    argument_bytes: float
    temp_bytes: float
    memory_budget: int
    flops: float
    exps: float
    gemm_bytes: float
    loops: tuple
    roofline_s: float
    bound: str
    max_images: int
    low_precision_s: float | None
    fits: bool
    note: str = ""

    def row(self) -> dict:
        """A flat, JSON-able record."""
        return dataclasses.asdict(self)


def _bank_shapes(m, scale, devices: int, mesh, axis: str) -> dict:
    """Shapes of the machine's prebuilt bank of ``scale`` without deduplication (an upper bound:
    every window of every image), split over ``devices`` as :meth:`BankMachine.prepare` would."""
    from jax.sharding import NamedSharding

    layout = m._bank_layout(scale)
    ch = m.image_shape[-1]
    out = {}
    sharded = Sharded(mesh, axis)
    for name, (bidx, center) in layout.items():
        g, pb, kk = bidx.shape
        u = m.num_images * pb
        mult = _banks.pad_multiple(u, devices)
        up = -(-u // mult) * mult
        d = kk * ch
        v = ch if center is not None else d
        shapes = _banks.DeviceBank(
            jax.ShapeDtypeStruct((1, g, d + 1, up), jnp.float32), jax.ShapeDtypeStruct((1, g, up, 1 + v), jnp.float32),
            jax.ShapeDtypeStruct((1, g, up, v), jnp.float32) if center is not None else None)
        specs = sharded._spec(shapes)
        out[name] = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p)),
                                 shapes, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return out


def _bank_bytes_per_image(m, scale, devices: int) -> float:
    """Bytes of the prebuilt bank per training image on one of ``devices`` (no deduplication)."""
    ch = m.image_shape[-1]
    total = 0.0
    for bidx, center in m._bank_layout(scale if m.needs_scale else None).values():
        g, pb, kk = bidx.shape
        v = ch if center is not None else kk * ch
        total += g * pb * 4.0 * ((kk * ch + 1) + (1 + v) + (v if center is not None else 0))
    return total / devices


def plan(
    machine: str = "els",
    *,
    scale: Any = 5,
    images: Sequence[int] = (50_000, 32, 32, 3),
    batch: int = 16,
    target: str = "h100",
    devices: int = 1,
    memory_budget: int | None = None,
    compile: bool = True,
) -> Plan:
    """Compile one exact ``denoise`` step of ``machine`` for ``target`` without data and predict it.

    Args:
        machine: a registered machine name (:func:`ellsjax.machines.names`).
        scale: its scale (a patch size for ELS/bbELS).
        images: the training set's shape ``(N, H, W, C)``.
        batch: images denoised per step.
        target: a key of :data:`TARGETS`.
        devices: devices per step; above 1 the bank machine's prebuilt banks are split over them
            (:class:`~ellsjax.machines.search.Sharded`, bank shapes without deduplication: an upper
            bound), else its windows are streamed from the images.
        memory_budget: bytes of temporaries per chunk (``None``: the target platform's default).
        compile: compile (memory analysis) as well as trace (counts only).

    Returns:
        A :class:`Plan`. Its time is a roofline prediction, not a measurement.
    """
    t = _target(target)
    n, h, w, c = (int(v) for v in images)
    spec = _machines.spec(machine)
    kw = {"platform": t.platform}
    if memory_budget is not None:
        kw["memory_budget"] = int(memory_budget)
    m = spec.build(jax.ShapeDtypeStruct((n, h, w, c), jnp.float32), **kw)
    devs = compile_devices(target, devices) if (compile or devices > 1) else None
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sharded = devices > 1
    if sharded:
        if not isinstance(m, _machines.BankMachine):
            raise ValueError(f"devices: {machine} has no banks to split over {devices} devices")
        mesh = Mesh(np.array(devs), ("bank",))
        key = _machines.base.bank_key(scale if m.needs_scale else None, False)
        m = dataclasses.replace(m, placement=Sharded(mesh, "bank"),
                                banks={key: _bank_shapes(m, scale if m.needs_scale else None, devices, mesh, "bank")})
    else:
        mesh = Mesh(np.array(devs[:1]), ("x",)) if devs is not None else None
    rep = (lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P()))) if mesh is not None \
        else (lambda s: s)
    args = jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None else rep(a), m,
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    x = rep(jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32))
    tt = rep(jax.ShapeDtypeStruct((batch,), jnp.float32))
    fn = jax.jit(lambda m, x, t: m._denoise(x, t, None, scale))
    traced = fn.trace(args, x, tt)
    cnt = count(traced.jaxpr)
    arg_b = temp_b = float("nan")
    fits = True
    note = ""
    if compile:
        try:
            mem = traced.lower().compile().memory_analysis()
            arg_b, temp_b = float(mem.argument_size_in_bytes), float(mem.temp_size_in_bytes)
        except Exception as e:  # noqa: BLE001 - a program that does not fit is a result of the plan
            fits, note = False, str(e).splitlines()[0][:200]
    # per device: a sharded pass's counts are its shard_map body's (local shapes)
    roof = {"matmul": cnt.flops / t.matmul, "exp": cnt.exps / t.exp, "memory": cnt.bytes / t.bandwidth}
    bound = max(roof, key=roof.get)
    low = None
    if isinstance(m, _machines.BankMachine):
        # a TopK(k=64) screen: the distance GEMM in bfloat16, exponentials of 64 candidates per query
        # (+ exact rescoring, negligible); the top-k selection itself is not modelled (a sort on GPUs)
        bidx = next(iter(m._bank_layout(scale if m.needs_scale else None).values()))[0]
        entries = n * bidx.shape[1] / (devices if sharded else 1)
        low = max(cnt.flops / t.matmul_low, cnt.bytes / 2 / t.bandwidth, cnt.exps * min(1.0, 64 / entries) / t.exp)
    # the largest N: arguments grow per image by its pixels (streamed) or by this device's share of the
    # prebuilt bank (sharded: the pass never reads the images, and the compiled program drops them);
    # temporaries are the chunk's, independent of N (where the full-size program did not fit, they
    # are taken from the same program at a small N)
    pixels = h * w * c * 4
    per_img = _bank_bytes_per_image(m, scale, devices) if sharded else pixels
    if compile and math.isnan(temp_b) and n > 256:
        small = plan(machine, scale=scale, images=(256, h, w, c), batch=batch, target=target, devices=devices,
                     memory_budget=memory_budget)
        temp_b = small.temp_bytes
    max_n = -1
    if not math.isnan(temp_b):
        fixed = 2 * batch * (pixels + 4)  # x_t and t (and the output)
        max_n = int((t.memory - temp_b - fixed) // per_img)
    return Plan(machine, scale, (n, h, w, c), int(batch), target, int(devices), sharded, arg_b, temp_b,
                int(m.policy.budget),
                cnt.flops, cnt.exps, cnt.bytes, cnt.loops, roof[bound], bound, max_n, low,
                fits and (math.isnan(arg_b) or arg_b + temp_b <= t.memory), note)
