"""The machine registry: a new machine is its module plus its tests.

The toy machine below lives only in this file. Registering its spec is all it takes for the command
line (`sample`, `evaluate`, `calibrate`, `machines`) and the library to run it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli
from ellsjax.machines import base


@dataclasses.dataclass(frozen=True, eq=False)
class BlurredWiener(base.Machine):
    """Toy: the isotropic-Gaussian posterior mean ``μ + aσ²/(a²σ² + s²)·(x_t − aμ)`` of the training
    set, box-blurred over a ``k×k`` window (its scale, an odd patch size)."""

    scale_kind: ClassVar[str] = "size"

    def _denoise(self, x_t, t, label, scale):
        ab, var = self.schedule.variances(t)
        a = jnp.sqrt(ab)[:, None, None, None]
        mu = jnp.mean(self.images, axis=0)
        s2 = jnp.var(self.images)
        x0 = mu + a * s2 / (a * a * s2 + var[:, None, None, None]) * (x_t - a * mu)
        pad = scale // 2
        win = (1, scale, scale, 1)
        summed = jax.lax.reduce_window(x0, 0.0, jax.lax.add, win, (1, 1, 1, 1),
                                       ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return summed / (scale * scale)


base.register(BlurredWiener)


def blurred_wiener(images, labels=None, *, schedule="cosine_legacy", chunk_size=None, memory_budget=None):
    return base.build(BlurredWiener, images, None, schedule=schedule, chunk_size=chunk_size,
                      memory_budget=memory_budget)


def _default_scales(dataset, image_shape, schedule):
    from ellsjax.scales import ScaleSchedule

    return ScaleSchedule.load(3, nsteps=20)


SPEC = ej.machines.MachineSpec(
    name="toy", builder=blurred_wiener, machine=BlurredWiener, calibration="grid", default_scales=_default_scales,
    summary="a blurred isotropic Wiener filter (test machine)",
)


@pytest.fixture
def toy():
    ej.machines.register(SPEC)
    yield SPEC
    ej.machines.unregister("toy")
    assert "toy" not in ej.machines.names()


def test_toy_machine_samples_from_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(["sample", "--machine", "toy", "--n-train", "8", "--image-size", "12", "--num-samples", "2",
                     "--steps", "4", "--out", str(out), "--no-progress"]) == 0
    assert "mapped onto --steps 4" in capsys.readouterr().err  # its 19-step default, on the 3-step grid
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["machine"] == "toy" and cfg["scales"] == [3, 3, 3]
    imgs, _ = ej.data.load("mnist", image_size=12, limit=8)
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
    want = ej.samplers.ddim(blurred_wiener(imgs), x, ej.schedules.paper_times(4), scales=[3, 3, 3])
    with np.load(out / "samples.npz") as z:
        np.testing.assert_allclose(z["samples"], np.asarray(want), atol=1e-6)
    assert cli.main(["machines"]) == 0
    assert "toy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"scales\[0\]: scale: patch size must be a positive odd int"):
        cli.main(["sample", "--machine", "toy", "--n-train", "8", "--image-size", "12", "--scales", "4",
                  "--out", str(tmp_path / "bad")])


def test_toy_machine_evaluates_and_calibrates_against_a_network(toy, trained_run, tmp_path):
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--model", str(trained_run), "--machine", "toy", "--scales", "3", "--n", "2",
                     "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["machine"] == "toy" and res["scales"] == [3] * 19
    assert cli.main(["calibrate", "--model", str(trained_run), "--machine", "toy", "--n", "2", "--steps", "3",
                     "--candidates", "1,3", "--out", str(tmp_path / "g.json")]) == 0
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["machine"] == "toy" and set(saved["scales"]) <= {1, 3}


def test_registry_contract():
    names = ej.machines.names()
    assert {"is", "els", "bbels", "ls", "pspc", "wiener", "pca", "cfdm", "soft-els", "soft-bbels"} <= set(names)
    assert list(ej.machines.MACHINES) == list(names)
    for s in ej.machines.specs():
        m = s.build(np.zeros((3, 8, 8, 1), np.float32))
        assert type(m) is s.machine and m.scale_kind == s.scale_kind, s.name
        if s.padding is not None:
            assert getattr(m, "padding", s.padding) == s.padding
        assert m.supports_provenance == s.provenance, s.name
    assert ej.machines.for_network("zeros").name == "bbels"
    assert ej.machines.for_network("circular").soft_twin == "soft-els"
    assert ej.machines.variant("els", "zeros").name == "bbels"
    with pytest.raises(ValueError, match="unknown machine 'vae'"):
        ej.machines.spec("vae")
    with pytest.raises(ValueError, match="registered already"):
        ej.machines.register(dataclasses.replace(ej.machines.spec("els"), summary="another"))
    with pytest.raises(ValueError, match="grid calibration needs integer scales"):
        ej.machines.MachineSpec(name="x", builder=ej.machines.wiener, machine=ej.machines.Wiener, calibration="grid",
                                summary="")
    with pytest.raises(ValueError, match="padding: must be one of zeros, circular"):
        ej.machines.MachineSpec(name="x", builder=blurred_wiener, machine=BlurredWiener, padding="reflect", summary="")
    with pytest.raises(TypeError, match="machine: expected the Denoiser class"):
        ej.machines.MachineSpec(name="x", builder=blurred_wiener, machine="size", summary="")


def test_published_defaults_come_from_the_specs():
    sched = ej.schedules.get("cosine_legacy")
    s = ej.machines.spec("bbels").scales_for("mnist", (32, 32, 1), sched)
    assert s.values == ej.presets.paper_scales("MNIST_ResNet_zeros") and s.source == "MNIST_ResNet_zeros"
    assert ej.machines.spec("is").scales_for("mnist", (32, 32, 1), sched) is None
    pspc = ej.machines.spec("pspc").scales_for("cifar10", (32, 32, 3), sched)
    assert pspc.values == ej.presets.PSPC_CIFAR10_SCALES and len(pspc.ts) == 19
    with pytest.raises(ValueError, match="32x32 CIFAR-10 only"):
        ej.machines.spec("pspc").scales_for("mnist", (32, 32, 1), sched)
    with pytest.raises(ValueError, match="needs a soft-window schedule"):
        ej.machines.spec("soft-els").scales_for("mnist", (32, 32, 1), sched)


def test_no_machine_name_is_compared_outside_machines():
    import re
    from pathlib import Path

    root = Path(ej.__file__).parent
    names = "|".join(re.escape(n) for n in ej.machines.names())
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = []
    for path in [*root.glob("cli/*.py"), root / "reproduce.py", root / "evaluation.py", root / "calibration.py",
                 root.parent / "scripts" / "bench_machines.py"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_root_package_is_lazy():
    import subprocess
    import sys

    code = ("import ellsjax.data, sys; "
            "assert not any(m.startswith(('ellsjax.machines', 'ellsjax.samplers')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('ellsjax'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
