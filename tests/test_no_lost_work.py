"""No silent misreads, no lost work, round 2 (issue 26): data names checked against file content,
non-finite training and sampling refused, SIGTERM, --resume of nothing, atomic outputs, output
locations claimed, memory guard, CLI wording, NCHW hint, defaults clipped to the image size, stage
lines."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import ellsjax as ej
from ellsjax import _io, cli, training
from ellsjax.cli import _calibrate, _common, _evaluate, _sample
from tests.conftest import tiny_net, tiny_train_config

# the smallest sample run of the CLI (8x8 bbELS on 6 bundled images, 2 steps)
SAMPLE = ["sample", "--n-train", "6", "--image-size", "8", "--num-samples", "3", "--steps", "2", "--scales", "3",
          "--no-progress"]


# -- data names are checked against what a file holds ----------------------------------------------------


def _npz(path, x, **extra):
    np.savez_compressed(path, x_train=x, y_train=np.zeros(len(x), np.uint8), **extra)
    return path


def test_a_file_of_another_dataset_is_refused_naming_both(tmp_path):
    cifar_like = _npz(tmp_path / "c.npz", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"name='mnist': .* holds 32x32x3 images, not mnist's 28x28x1 .*cifar10"):
        ej.data.load("mnist", source="npz", path=cifar_like)
    # Fashion-MNIST's first training image (the bundled prefix) in a file read as MNIST, and back
    for name, other in (("mnist", "fashion_mnist"), ("fashion_mnist", "mnist")):
        f = _npz(tmp_path / f"{other}.npz", np.asarray((ej.data.load(other, limit=3).images + 1) * 127.5 + 0.5,
                                                      np.uint8)[..., 0])
        with pytest.raises(ValueError, match=f"holds {other}, not {name}: its first train image is {other}'s"):
            ej.data.load(name, source="npz", path=f)
        assert ej.data.load(other, source="npz", path=f).images.shape == (3, 28, 28, 1)
    # a file that names itself: checked against its name instead of the shape (a resized copy)
    small = _npz(tmp_path / "s.npz", np.zeros((2, 8, 8), np.uint8), name="fashion_mnist")
    assert ej.data.load("fashion_mnist", source="npz", path=small).images.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="says it holds 'fashion_mnist'"):
        ej.data.load("mnist", source="npz", path=small)


def test_sample_refuses_a_dataset_mismatch_before_sampling(tmp_path, monkeypatch):
    f = _npz(tmp_path / "mnist.npz", np.asarray((ej.data.load("mnist", limit=6).images + 1) * 127.5 + 0.5,
                                                np.uint8)[..., 0])
    monkeypatch.setattr(ej.samplers, "ddim", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit, match="holds mnist, not fashion_mnist") as e:
        cli.main([*SAMPLE, "--dataset", "fashion_mnist", "--source", "npz", "--path", str(f), "--out",
                  str(tmp_path / "o")])
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "o" / "config.json").exists()


def test_nchw_batches_get_a_hint():
    x = np.zeros((3, 1, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"images: .* looks like NCHW .* x\.transpose\(0, 2, 3, 1\)"):
        ej.machines.els(x)
    m = ej.machines.els(np.zeros((3, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="x_t: expected images of shape .* looks like NCHW"):
        m.denoise(x, 0.5, scale=3)
    ej.machines.els(np.zeros((2, 16, 16, 3), np.float32))  # NHWC RGB: no hint


# -- training: non-finite losses, SIGTERM, --resume of nothing ----------------------------------------------


def _poisoned_step(monkeypatch, at: int, *, params: bool = False):
    """The real train step, but update ``at`` (1-based) returns a NaN loss (or NaN weights)."""
    real = training.make_train_step
    count = [0]

    def make(*a, **k):
        step = real(*a, **k)

        def poisoned(p, o, e, batch, key):
            p, o, e, loss = step(p, o, e, batch, key)
            count[0] += 1
            if count[0] == at:
                if params:
                    import jax

                    p, e = jax.tree.map(lambda v: v * np.nan, (p, e))
                else:
                    loss = loss * np.nan
            return p, o, e, loss
        return poisoned

    monkeypatch.setattr(training, "make_train_step", make)


@pytest.mark.parametrize("params", [False, True], ids=["loss", "weights"])
def test_training_stops_at_the_first_nonfinite_loss_keeping_the_last_good_checkpoint(params, tmp_path, monkeypatch):
    _poisoned_step(monkeypatch, 5, params=params)
    cfg = tiny_train_config(steps=8, checkpoint_every=2)
    with pytest.raises(training.NonFiniteLossError) as e:
        training.train(tmp_path, tiny_net(), cfg, progress=False)
    # a NaN loss at update 5 stops at 5; NaN weights after update 5 show at its checkpoint (6)
    # or in the loss of update 6, whichever comes first: never saved
    assert e.value.step == (5 if not params else 6)
    assert f"at step {e.value.step}" in str(e.value) and "last good checkpoint, step 4" in str(e.value)
    assert training.latest_step(tmp_path) == 4
    assert np.isfinite(np.asarray(ej.models.load(tmp_path).denoise(np.zeros((1, 12, 12, 1), np.float32), 0.5))).all()


def test_a_diverged_network_is_refused_by_load_and_sample(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poisoned_step(monkeypatch, 3, params=True)
    monkeypatch.setattr(training, "_all_finite", lambda tree: True)  # what runs of earlier versions saved
    training.train(run, tiny_net(), tiny_train_config(), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="weights of .* contain NaN or inf; the run diverged"):
        ej.models.load(run)
    with pytest.raises(SystemExit, match="--model: the ema weights .* contain NaN or inf") as e:
        cli.main(["sample", "--model", str(run), "--out", str(tmp_path / "s"), "--no-progress"])
    assert "\n" not in str(e.value.code)


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    def terminate_at_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what kill, SLURM and Kubernetes send

    before = signal.getsignal(signal.SIGTERM)
    result = training.train(tmp_path, tiny_net(), tiny_train_config(steps=6), progress=False, callback=terminate_at_2)
    assert result.interrupted and result.signal == signal.SIGTERM and result.step == 2
    assert training.latest_step(tmp_path) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_train_exit_status_and_resume_of_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained"))
    for out in (tmp_path / "TYPO", tmp_path):
        with pytest.raises(SystemExit, match=f"--resume: {out} .*drop --resume to start a new run"):
            cli.main(["train", "--out", str(out), "--resume", "--steps", "10"])
    assert not (tmp_path / "TYPO").exists()
    # a run stopped by SIGTERM exits 143 (128 + 15), by Ctrl-C 130
    monkeypatch.setattr(training, "train", lambda out, *a, **k: training.TrainResult(
        Path(out), 2, True, 1.0, signal.SIGTERM))
    argv = ["train", "--out", str(tmp_path / "r"), "--steps", "3", "--limit", "32", "--image-size", "12",
            "--width", "16", "--depth", "2"]
    assert cli.main(argv) == 143
    assert "terminated (SIGTERM) at step 2" in capsys.readouterr().out


# -- outputs: atomic, claimed, one-line errors ----------------------------------------------------------


def test_a_failed_write_leaves_the_previous_file_or_none(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert cli.main([*SAMPLE, "--out", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in _sample._OUTPUTS}

    def full_disk(f, **arrays):  # writes part of the archive, then the disk is full
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.np, "savez_compressed", full_disk)
    with pytest.raises(SystemExit) as e:
        cli.main([*SAMPLE, "--out", str(out), "--overwrite", "--seed", "1"])
    assert str(e.value.code) == f"ellsjax: error: cannot write {out / 'samples.npz'}: no space left on the device"
    assert {n: (out / n).read_bytes() for n in _sample._OUTPUTS} == before  # the previous run, whole
    assert sorted(p.name for p in out.iterdir()) == sorted(_sample._OUTPUTS)  # no temporary file, no lock


def test_a_small_tmpfs_fills_up_without_a_partial_file(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched writer above covers the same path")
    try:
        with pytest.raises(SystemExit, match="no space left on the device"):
            cli.main([*SAMPLE, "--num-samples", "40", "--out", str(mnt / "o")])
        assert sorted(p.name for p in (mnt / "o").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_output_directory_with_results_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    names = ["samples.npz", "config.json"]
    _common.claim_outputs(out, names, overwrite=False)
    _common.release_claims()
    (out / "samples.npz").write_bytes(b"earlier")
    with pytest.raises(SystemExit, match=r"already holds the results of an earlier run \(samples.npz\); pass "
                                         "--overwrite"):
        _common.claim_outputs(out, names, overwrite=False)
    _common.claim_outputs(out, names, overwrite=True)
    # another live ellsjax process writing there (its pid in the lock): refused even with --overwrite
    _common.release_claims()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".ellsjax.lock").write_text(f"{other.pid} ellsjax sample\n")
        with pytest.raises(SystemExit, match=f"being written by another ellsjax run \\(pid {other.pid}\\)"):
            _common.claim_outputs(out, ["samples.npz"], overwrite=True)
    finally:
        other.kill()
        other.wait()
    # the lock of a run that died (kill -9) is taken over
    _common.claim_outputs(out, ["samples.npz"], overwrite=True)
    assert (out / ".ellsjax.lock").read_text().split()[0] == str(os.getpid())
    _common.release_claims()
    assert not (out / ".ellsjax.lock").exists()


def test_evaluate_writes_per_machine_by_default(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(ej.evaluation, "sample", stop)
    for machine in ("is", "wiener"):
        with pytest.raises(Stop):
            cli.main(["evaluate", "--model", str(trained_run), "--machine", machine, "--n", "2"])
        assert (tmp_path / "evaluation" / machine).is_dir()
    with pytest.raises(SystemExit, match="the samples of the network in M contain NaN or inf"):
        _evaluate._finite(np.array([[0.0], [np.nan]]), "the network in M")


def test_evaluation_names_the_denoiser_with_nonfinite_samples():
    # the library names the denoiser whose samples are not finite (not "pred, ref: contain NaN")
    imgs = np.random.default_rng(0).uniform(-1, 1, (4, 4, 4, 1)).astype(np.float32)
    x = np.zeros((2, 4, 4, 1), np.float32)
    is_ = ej.machines.ideal(imgs)
    with pytest.raises(ValueError, match=r"network: its samples contain NaN or inf \(1 of 2 seeds, e.g. seed 1\)"):
        ej.evaluation.evaluate(is_, is_, x, [0.5, 0.0], network_samples=np.stack([x[0], x[1] * np.nan]))


def test_sample_runs_in_batches_within_a_memory_guard(tmp_path, monkeypatch):
    one = tmp_path / "one"
    assert cli.main([*SAMPLE, "--out", str(one)]) == 0
    two = tmp_path / "two"
    assert cli.main([*SAMPLE, "--out", str(two), "--batch-size", "2"]) == 0
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        np.testing.assert_array_equal(a["x_start"], b["x_start"])
        np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-5)
    monkeypatch.setattr(_sample, "free_memory", lambda: 10 << 20)
    with pytest.raises(SystemExit, match=r"--num-samples: 1000000 samples of 8x8x1 need 0.7 GiB .* 0.0 GiB available"):
        cli.main([*SAMPLE, "--num-samples", "1000000", "--out", str(tmp_path / "big")])
    with pytest.raises(SystemExit, match="the samples of --machine bbels contain NaN or inf"):
        _sample._check_finite(np.full((2, 1), np.nan), "--machine bbels")


# -- messages that speak CLI --------------------------------------------------------------------------


def test_model_and_samples_messages_name_the_flag(trained_run, tmp_path):
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit, match="--model: .*config.json is a file; give the run directory"):
        cli.main(["sample", "--model", str(trained_run / "config.json"), *out])
    with pytest.raises(SystemExit, match="--class: the network in .* is unconditional .*; drop --class") as e:
        cli.main(["sample", "--model", str(trained_run), "--class", "3", *out])
    assert "label=None" not in str(e.value.code)
    bad = tmp_path / "samples.npz"
    bad.write_bytes(b"PK\x03\x04 truncated by a crash")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--samples: cannot read .*samples.npz \(BadZipFile") as e:
        cli.main(["explain", "--samples", str(bad)])
    assert "\n" not in str(e.value.code)
    assert _common.cli_message("label: no images of class 4", _sample._FLAGS) == "--class: no images of class 4"


# -- defaults clipped to the image size --------------------------------------------------------------


def test_calibration_defaults_fit_the_network(capsys):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    network = SimpleNamespace(schedule=ej.schedules.cosine_legacy(), image_shape=(8, 8, 1))
    assert _calibrate._default_candidates(ej.machines.els(images), network) == (1, 3, 5, 7)
    assert "the default 1,3,…,15 clipped to 1,3,5,7" in capsys.readouterr().err
    assert _calibrate._default_candidates(ej.machines.els(images, padding="zeros"), network) == (
        1, 3, 5, 7, 9, 11, 13, 15)  # bbELS takes any odd size (k >= 8 is the LS machine)
    for name, side in (("soft-els", 7), ("soft-bbels", 7)):
        args = SimpleNamespace(support=None, window="box")
        m = _calibrate._build(ej.machines.spec(name), images, None, network, args)
        assert m.support == side, name
        assert f"the default 11 clipped to {side}" in capsys.readouterr().err
    args = SimpleNamespace(support=11, window="box")  # given explicitly: not adapted
    with pytest.raises(ValueError, match="support"):
        _calibrate._build(ej.machines.spec("soft-els"), images, None, network, args)


# -- long commands say what they do (explain's stage lines: tests/test_explain.py) ---------------------------


def test_help_states_the_new_guarantees(capsys):
    for command, words in (("sample", "refused up front with the size it needs"), ("train", "SIGTERM"),
                           ("explain", "line per stage"), ("evaluate", "evaluation/MACHINE"),
                           ("calibrate", "those the machine accepts")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert words in " ".join(capsys.readouterr().out.split()), command


def test_atomic_path_keeps_the_suffix_and_cleans_up(tmp_path):
    target = tmp_path / "fig.png"
    with pytest.raises(_io.OutputError, match=f"cannot write {target}: no space left on the device"):
        with _io.atomic_path(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
