"""First contact: no lost work (outputs checked before compute, corrupt checkpoints skipped), no
silent misreads, clear messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli, training
from ellsjax.scales import ScaleSchedule
from tests.conftest import tiny_net, tiny_train_config

# -- 1. every command that writes checks its output location before computing -------------------


def _no_compute(monkeypatch):
    """Make the expensive entry points fail loudly if reached."""
    def boom(*a, **k):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(ej.samplers, "ddim", boom)
    monkeypatch.setattr(ej.evaluation, "evaluate", boom)
    monkeypatch.setattr(ej.calibration, "network_trajectory", boom)
    monkeypatch.setattr(ej.explain, "provenance", boom)
    monkeypatch.setattr(ej.reproduce, "run", boom)
    monkeypatch.setattr(training, "train", boom)


@pytest.fixture(scope="module")
def saved_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    assert cli.main(["sample", "--n-train", "6", "--image-size", "8", "--num-samples", "1", "--steps", "2",
                     "--scales", "3", "--out", str(out), "--no-progress"]) == 0
    return out / "samples.npz"


@pytest.mark.parametrize("bad", ["file", "under_file"])
@pytest.mark.parametrize("command", ["sample", "train", "evaluate", "calibrate", "explain", "reproduce"])
def test_outputs_are_checked_before_any_compute(command, bad, tmp_path, monkeypatch, trained_run, saved_samples):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker if bad == "file" else blocker / "sub"
    if command == "calibrate" and bad == "file":  # its output is a file: a directory is the wrong kind
        blocker = out = tmp_path
    argv = {
        "sample": ["sample", "--n-train", "4", "--image-size", "8", "--scales", "3"],
        "train": ["train", "--steps", "3", "--limit", "32", "--image-size", "12", "--width", "16", "--depth", "2"],
        "evaluate": ["evaluate", "--model", str(trained_run), "--machine", "is", "--n", "2"],
        "calibrate": ["calibrate", "--model", str(trained_run), "--machine", "els", "--n", "2"],
        "explain": ["explain", "--samples", str(saved_samples)],
        "reproduce": ["reproduce", "--preset", "smoke"],
    }[command]
    _no_compute(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(out)])
    msg = str(e.value.code)
    assert msg.startswith("ellsjax: error: --out:") and str(blocker) in msg, msg


def test_output_directory_that_cannot_be_created(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(SystemExit, match="--out: cannot create the directory"):
        cli.main(["sample", "--n-train", "4", "--image-size", "8", "--out", "/proc/ellsjax-cannot-exist"])


# -- 2. a corrupt newest checkpoint: fall back to the newest readable one ------------------------


@pytest.fixture(scope="module")
def five_checkpoints(tmp_path_factory):
    """An uninterrupted 5-step run with a checkpoint after every step."""
    d = tmp_path_factory.mktemp("ckpt")
    training.train(d, tiny_net(), tiny_train_config(steps=5, checkpoint_every=1, keep_checkpoints=5),
                   progress=False)
    return d


def _corrupt(run: Path, step: int, how: str) -> None:
    item = run / "checkpoints" / str(step) / "params"
    if how == "truncated_array":
        for f in (item / "ocdbt.process_0" / "d").iterdir():
            f.write_bytes(f.read_bytes()[:5])
    elif how == "empty_manifest":
        (item / "manifest.ocdbt").write_bytes(b"")
    else:
        meta = item / "_METADATA"
        meta.write_bytes(meta.read_bytes()[:10])


def _same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True))


@pytest.mark.parametrize("how", ["truncated_array", "empty_manifest", "truncated_metadata"])
def test_loading_skips_a_corrupt_newest_checkpoint(five_checkpoints, how, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(five_checkpoints, run)
    _corrupt(run, 5, how)
    model = ej.models.load(run, ema=False)
    err = capsys.readouterr().err
    assert "cannot read" in err and "/5" in err and "using checkpoint 4" in err
    assert _same_weights(model, ej.models.load(five_checkpoints, ema=False, step=4))
    with pytest.raises(ValueError, match="cannot read"):  # an explicit step gets no substitute
        ej.models.load(run, ema=False, step=5)


def test_resume_redoes_the_steps_after_the_last_readable_checkpoint(five_checkpoints, tmp_path):
    # a run stopped after its checkpoint 3, which is corrupt: resuming to 5 restarts from 2
    run = tmp_path / "run"
    shutil.copytree(five_checkpoints, run)
    for step in (4, 5):
        shutil.rmtree(run / "checkpoints" / str(step))
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:3]))
    _corrupt(run, 3, "truncated_metadata")
    # a separate process, as a user runs it: one note per event on stderr, no teardown tracebacks
    r = subprocess.run([sys.executable, "-m", "ellsjax", "train", "--out", str(run), "--resume", "--steps", "5",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "using checkpoint 2 instead" in r.stderr and "Traceback" not in r.stderr, r.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps after 2 redone, their lines replaced, not duplicated
    assert (run / "checkpoints_unreadable" / "3").is_dir() and training.latest_step(run) == 5
    # bit-exact against the uninterrupted run
    assert _same_weights(ej.models.load(run, ema=False), ej.models.load(five_checkpoints, ema=False))


# -- 3. silent misreads become clear errors ---------------------------------------------------------


def test_images_outside_the_documented_range_are_refused():
    imgs = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"images: values lie in \[.*\], outside the documented image range "
                                         r"\[-1, 1\]; 8-bit pixels p in \[0, 255\] convert with p/127.5 - 1"):
        ej.machines.els(imgs)
    with pytest.raises(ValueError, match="outside the documented image range"):
        training._check_data(tiny_net(), np.zeros((4, 12, 12, 1), np.float32) + 3.0, None)
    ej.machines.els(imgs / 127.5 - 1)  # the conversion the message names is accepted


def test_fractional_patch_sizes_are_not_truncated(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"ts": [0.9, 0.5, 0.0], "scales": [3.7, 5.2]}))
    with pytest.raises(ValueError, match="expected integer patch sizes, got 3.7"):
        ScaleSchedule.load(str(p))
    with pytest.raises(SystemExit, match="expected integer patch sizes"):
        cli.main(["sample", "--n-train", "4", "--image-size", "8", "--scales", str(p), "--out", str(tmp_path / "o")])


def test_steps_with_a_preset_maps_the_preset_and_says_so(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["sample", "--n-train", "6", "--steps", "5", "--num-samples", "1", "--out", str(out),
                     "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["ts"]) == 5 and len(cfg["scales"]) == 4
    want = ej.scales.ScaleSchedule.load("MNIST_ResNet_zeros").on_grid(ej.schedules.paper_times(5)).values
    assert cfg["scales"] == list(want)
    assert "MNIST_ResNet_zeros has 19 steps; mapped onto --steps 5" in capsys.readouterr().err


def test_scales_are_not_silently_ignored(tmp_path, trained_run):
    with pytest.raises(SystemExit, match="--machine is takes no scale"):
        cli.main(["sample", "--machine", "is", "--scales", "4", "--n-train", "4", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="a network takes no scales"):
        cli.main(["sample", "--model", str(trained_run), "--scales", "4", "--out", str(tmp_path / "b")])


# -- 4. clear messages ----------------------------------------------------------------------------------


def test_clear_messages(tmp_path):
    bad = tmp_path / "random.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(ValueError, match="is not an .npz archive") as e:
        ej.data.load("mnist", source="npz", path=bad)
    assert "allow_pickle" not in str(e.value)
    with pytest.raises(ValueError, match="class 11 absent"):
        ej.data.load("mnist", classes=[11], limit=4)
    with pytest.raises(SystemExit, match="--num-samples: 2000000000 samples of 32x32x1 need"):
        cli.main(["sample", "--num-samples", "2000000000", "--n-train", "4", "--out", str(tmp_path / "o")])


def test_help_states_each_default_once_and_documents_every_option(capsys):
    for command in ("train", "sample", "evaluate", "calibrate", "explain", "reproduce"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text, command
        for line in text.splitlines():
            assert line.count("default") <= 1, (command, line)
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for opt, words in (("--split", "dataset split"), ("--num-samples", "number of samples"), ("--seed", "seed")):
        assert f"{opt} " in text and words in text, opt
