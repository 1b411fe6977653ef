"""The command line: help, a tiny end-to-end sample run, and clear errors."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli
from ellsjax.scales import ScaleSchedule
from tests.conftest import SHARED, needs_shared


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ["--machine", "--dataset", "--source", "--padding", "--class", "--num-samples", "--seed", "--out", "--scales"]:
        assert opt in out


@pytest.mark.skipif(shutil.which("ellsjax") is None, reason="console script not installed")
def test_console_script_help():
    r = subprocess.run(["ellsjax", "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--machine" in r.stdout


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "ellsjax", "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "boundary-broken ELS" in " ".join(r.stdout.split())


def test_tiny_sample_run(tmp_path):
    out = tmp_path / "run"
    code = cli.main(["sample", "--n-train", "12", "--image-size", "12", "--num-samples", "2", "--steps", "3",
                     "--scales", "5,3", "--out", str(out), "--no-progress", "--seed", "3"])
    assert code == 0
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (2, 12, 12, 1) and np.all(np.isfinite(z["samples"]))
        np.testing.assert_allclose(z["ts"], [2 / 3, 1 / 3, 0.0], atol=1e-6)
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["machine"] == "bbels" and cfg["padding"] == "zeros" and cfg["scales"] == [5, 3] and cfg["n_train"] == 12
    # the same run through the library: bbELS on the first 12 bundled images, DDIM from key(seed)
    imgs, _ = ej.data.load("mnist", image_size=12, limit=12)
    ref = ej.samplers.ddim(ej.machines.bbels(imgs), jax.random.normal(jax.random.key(3), (2, 12, 12, 1)),
                           [2 / 3, 1 / 3, 0.0], scales=[5, 3])
    with np.load(out / "samples.npz") as z:
        np.testing.assert_allclose(z["samples"], np.asarray(ref), atol=1e-5)


def test_tiny_conditional_ideal_run(tmp_path):
    code = cli.main(["sample", "--machine", "is", "--class", "7", "--n-train", "40", "--image-size", "8",
                     "--num-samples", "1", "--steps", "3", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert json.loads((tmp_path / "config.json").read_text())["label"] == 7
    imgs, labels = ej.data.load("mnist", image_size=8, limit=40)
    ref = ej.samplers.ddim(ej.machines.ideal(imgs, labels), jax.random.normal(jax.random.key(0), (1, 8, 8, 1)),
                           ej.schedules.paper_times(3), label=7)
    with np.load(tmp_path / "samples.npz") as z:
        sample = z["samples"][0]
    np.testing.assert_allclose(sample, np.asarray(ref)[0], atol=1e-5)
    # of its class: its nearest training image is a 7 (from this noise the unconditional sample is a 4)
    dist = ((np.asarray(imgs) - sample) ** 2).sum((1, 2, 3))
    assert labels[dist.argmin()] == 7 and dist.min() < 0.5 * dist[labels != 7].min()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--dataset", "svhn"], "unknown dataset"),
        (["--source", "npz", "--path", "/nonexistent/x.npz"], "/nonexistent/x.npz"),
        (["--scales", "3,3"], "spec: expected 19 scales"),
        (["--scales", "bogus"], "neither a preset"),
        (["--num-samples", "0"], "--num-samples must be positive"),
        (["--machine", "bbels", "--padding", "circular"], "use --machine els"),
        (["--machine", "vae"], "--machine: unknown machine 'vae'"),
        (["--machine-option", "rank"], "expected KEY=VALUE"),
        (["--machine-option", "chunk_size=0"], "chunk_size: expected a positive int"),
        (["--class", "42"], "--class: no training images of class"),
        (["--machine", "els", "--image-size", "8", "--scales", "MNIST_ResNet_circular"], "exceed the 8px images"),
        (["--machine", "pspc"], "PSPC's published scale schedule is for 32x32 CIFAR-10 only"),
    ],
)
def test_errors_are_clear(argv, msg, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--n-train", "8", "--out", str(tmp_path), *argv])
    assert msg in str(e.value.code)


@needs_shared("cifar10_subset.npz")
def test_pspc_uses_its_published_cifar10_schedule(tmp_path):
    code = cli.main(["sample", "--machine", "pspc", "--dataset", "cifar10", "--source", "npz", "--path", str(SHARED),
                     "--n-train", "4", "--num-samples", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["scales"] == list(ej.machines.PSPC_CIFAR10_SCALES)
    np.testing.assert_allclose(cfg["ts"], ej.edm.karras_times(18, "cosine_legacy"), atol=1e-6)


def test_soft_machine_samples_from_a_learned_schedule_file(tmp_path):
    ts = tuple(ej.schedules.paper_times(3))
    ScaleSchedule(ts, (2.0, 1.0), "width", padding="zeros", options={"support": 5, "window": "box", "edge": 0.15}
                  ).save(tmp_path / "soft.json")
    out = tmp_path / "run"
    code = cli.main(["sample", "--machine", "soft-bbels", "--n-train", "10", "--image-size", "12", "--num-samples", "2",
                     "--scales", str(tmp_path / "soft.json"), "--out", str(out), "--no-progress"])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scales"] == [2.0, 1.0] and cfg["machine_options"] == {"support": 5, "window": "box", "edge": 0.15}
    with np.load(out / "samples.npz") as z:
        assert z["samples"].shape == (2, 12, 12, 1) and np.all(np.isfinite(z["samples"]))
        np.testing.assert_allclose(z["scales"], [2.0, 1.0])
    # the same run through the library: the CLI adds nothing to the machine
    imgs, _ = ej.data.load("mnist", image_size=12, limit=10)
    m = ej.machines.soft_els(imgs, padding="zeros", support=5, window="box", edge=0.15)
    ref = ej.samplers.ddim(m, jax.random.normal(jax.random.key(0), (2, 12, 12, 1)), ts, scales=[2.0, 1.0])
    with np.load(out / "samples.npz") as z:
        np.testing.assert_allclose(z["samples"], np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--machine", "soft-els"], "needs a soft-window schedule"),
        (["--machine", "soft-els", "--scales", "MNIST_ResNet_zeros"], "comma-separated widths"),
        (["--machine", "soft-els", "--scales", "1.5,0"], "must be positive"),
        (["--machine", "soft-els", "--scales", "1.5,2"], "expected 19 widths"),
    ],
)
def test_soft_machine_errors_are_clear(argv, msg, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--n-train", "8", "--image-size", "12", "--out", str(tmp_path), *argv])
    assert msg in str(e.value.code)


def test_soft_schedule_padding_must_match_the_machine(tmp_path):
    ScaleSchedule(tuple(ej.schedules.paper_times(3)), (2.0, 1.0), "width", padding="circular",
                  options={"support": 5}).save(tmp_path / "soft.json")
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--machine", "soft-bbels", "--n-train", "8", "--image-size", "12", "--out",
                  str(tmp_path / "o"), "--scales", str(tmp_path / "soft.json")])
    assert "use --machine soft-els" in str(e.value.code)
