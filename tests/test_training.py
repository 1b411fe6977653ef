"""The trainer: learning, exact resume (also after Ctrl-C), data order, checks, and ``ellsjax train``."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli, nets, training

NET = nets.NetConfig(arch="resnet", image_size=12, width=16, depth=2)
UNET = nets.NetConfig(arch="unet", image_size=12, width=8, depth=2, emb_dim=16)
# lr 2e-3 (the paper: 1e-4 for 300 epochs) so that a hundred updates show learning. Every test
# here uses these optimizer settings and batch shape, so each network compiles one train step.
FAST = training.TrainConfig(steps=100, batch_size=16, lr=2e-3, ema_decay=0.9, log_every=1, checkpoint_every=1000)


@pytest.fixture(scope="module")
def mnist():
    return ej.data.load("mnist", limit=256, image_size=12)


def read_metrics(d):
    with open(os.path.join(d, training.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("net", [NET, UNET], ids=["resnet", "unet"])
def test_loss_falls_within_a_hundred_steps(net, mnist, tmp_path):
    result = training.train(tmp_path, net, FAST, data=mnist, progress=False)
    assert result.step == 100 and not result.interrupted
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(1, 101))
    first, last = np.mean([r["loss"] for r in m[:10]]), np.mean([r["loss"] for r in m[-10:]])
    assert first > 0.6 and last < 0.55 * first, (first, last)
    # lr of update s (1-based) is lr·γ^(s−1); throughput is reported
    np.testing.assert_allclose([r["lr"] for r in m], 2e-3 * 0.999965 ** np.arange(100), rtol=1e-12)
    assert all(r["images_per_s"] > 0 for r in m)
    assert training.latest_step(tmp_path) == 100


# Resume: 8 updates of 16 images from 40 (2 batches per epoch, so 4 epochs and 4 permutations), an
# EMA, checkpoints every 4 updates.
RESUME = dataclasses.replace(FAST, steps=8, checkpoint_every=4, limit=40, seed=3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    training.train(d, NET, RESUME, progress=False)
    return d


def assert_same_run(a, b):
    assert read_metrics(a) and [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]
    for ema in (False, True):
        sa, sb = ej.models.load(a, ema=ema).state, ej.models.load(b, ema=ema).state
        for x, y in zip(jax_leaves(sa), jax_leaves(sb)):
            assert np.array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree.leaves(tree)]


def test_resume_reproduces_an_uninterrupted_run_bitwise(straight, tmp_path):
    half = training.train(tmp_path, NET, dataclasses.replace(RESUME, steps=4), progress=False)
    assert half.step == 4 and training.latest_step(tmp_path) == 4
    net, cfg = training.load_run_config(tmp_path)
    assert net == NET and cfg.steps == 4
    training.train(tmp_path, net, dataclasses.replace(cfg, steps=8), resume=True, progress=False)
    assert_same_run(straight, tmp_path)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(straight, tmp_path):
    def interrupt_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    before = signal.getsignal(signal.SIGINT)
    result = training.train(tmp_path, NET, RESUME, progress=False, callback=interrupt_at_3)
    assert result.interrupted and result.step == 3 and training.latest_step(tmp_path) == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is removed again
    result = training.train(tmp_path, NET, RESUME, resume=True, progress=False)
    assert result.step == 8 and not result.interrupted
    assert_same_run(straight, tmp_path)


def test_a_run_directory_is_protected(straight, tmp_path):
    with pytest.raises(ValueError, match="already holds a training run"):
        training.train(straight, NET, RESUME, progress=False)
    with pytest.raises(ValueError, match="net: cannot resume .* different network"):
        training.train(straight, dataclasses.replace(NET, depth=3), RESUME, resume=True, progress=False)
    with pytest.raises(ValueError, match="config: cannot resume .*'lr'"):
        training.train(straight, NET, dataclasses.replace(RESUME, lr=1e-3), resume=True, progress=False)
    images, labels = ej.data.load("mnist", limit=40, image_size=12)
    images[0] = -images[0]
    with pytest.raises(ValueError, match="data: the training images differ"):
        training.train(straight, NET, RESUME, data=(images, labels), resume=True, progress=False)
    with pytest.raises(ValueError, match="steps: the run is already at step 8"):
        training.train(straight, NET, dataclasses.replace(RESUME, steps=5), resume=True, progress=False)


def test_batches_are_epoch_permutations_fixed_by_seed_and_step():
    n, b = 10, 3
    epoch0 = [training.batch_indices(s, n=n, batch_size=b, seed=7) for s in range(3)]
    epoch1 = [training.batch_indices(s, n=n, batch_size=b, seed=7) for s in range(3, 6)]
    for epoch in (epoch0, epoch1):
        flat = np.concatenate(epoch)
        assert len(set(flat.tolist())) == 9 and flat.min() >= 0 and flat.max() < n  # no repeats within an epoch
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    np.testing.assert_array_equal(training.batch_indices(4, n=n, batch_size=b, seed=7), epoch1[1])
    assert not np.array_equal(training.batch_indices(4, n=n, batch_size=b, seed=8), epoch1[1])
    with pytest.raises(ValueError, match="batch_size: 11 is larger than the 10"):
        training.batch_indices(0, n=n, batch_size=11, seed=0)


def test_data_must_fit_the_network(mnist, tmp_path):
    cfg = RESUME
    with pytest.raises(ValueError, match="data: the images have 1 channel.* channels=3"):
        training.train(tmp_path, dataclasses.replace(NET, channels=3), cfg, data=mnist, progress=False)
    with pytest.raises(ValueError, match="data: the images are 12x12 .* image_size=16"):
        training.train(tmp_path, dataclasses.replace(NET, image_size=16), cfg, data=mnist, progress=False)
    cond = dataclasses.replace(NET, conditional=True, num_classes=5)
    with pytest.raises(ValueError, match=r"data: labels must lie in \[0, 5\)"):
        training.train(tmp_path, cond, cfg, data=mnist, progress=False)
    with pytest.raises(ValueError, match="celeb_a has no class labels"):
        training.load_data(dataclasses.replace(cond, channels=3), dataclasses.replace(cfg, dataset="celeb_a"))
    with pytest.raises(ValueError, match="batch_size: 512 is larger than the 256"):
        training.train(tmp_path, NET, dataclasses.replace(cfg, batch_size=512), data=mnist, progress=False)
    assert not (tmp_path / training.CONFIG_FILE).exists()  # nothing written for a rejected run


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"steps": 0}, "steps: expected a positive int"),
        ({"lr": -1.0}, "lr: must lie in"),
        ({"lr_decay": 1.5}, "lr_decay: must lie in"),
        ({"ema_decay": 1.0}, "ema_decay: must lie in"),
        ({"schedule": "quadratic"}, "schedule: unknown schedule"),
        ({"seed": -1}, "seed: expected a non-negative int"),
    ],
)
def test_bad_train_config_is_a_clear_error(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        training.TrainConfig(**{"steps": 1, **kwargs})


def test_train_config_round_trips_through_a_dict():
    cfg = training.TrainConfig(steps=5, ema_decay=0.99, schedule=ej.schedules.cosine(0.01))
    assert training.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


TINY = ["--arch", "resnet", "--dataset", "mnist", "--image-size", "12", "--width", "16", "--depth", "2",
        "--batch-size", "16", "--lr", "2e-3", "--ema", "0.9", "--limit", "64", "--no-progress", "--log-every", "1"]


def test_cli_train_then_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", *TINY, "--conditional", "--steps", "3", "--out", out]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3] and "loss" in read_metrics(out)[0]
    cfg = json.loads((tmp_path / "run" / training.CONFIG_FILE).read_text())
    assert cfg["net"]["width"] == 16 and cfg["train"]["dataset"] == "mnist" and cfg["train"]["steps"] == 3
    assert cfg["net"]["conditional"] and cfg["net"]["num_classes"] == 10
    with pytest.raises(SystemExit, match="--class: the network in .* is class-conditional"):
        cli.main(["sample", "--model", out, "--out", str(tmp_path / "s"), "--no-progress"])
    assert cli.main(["train", "--out", out, "--resume", "--steps", "5", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert "sample with `ellsjax sample --model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--width: the run in .* has width=16"):
        cli.main(["train", "--out", out, "--resume", "--width", "32"])
    with pytest.raises(SystemExit, match="--lr: the run in .* has lr=0.002"):
        cli.main(["train", "--out", out, "--resume", "--lr", "1e-4"])
    with pytest.raises(SystemExit, match="already holds a training run"):
        cli.main(["train", *TINY, "--steps", "3", "--out", out])


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--kernel-size", "4", "--steps", "1"], "--kernel-size: must be odd"),
        (["--dataset", "svhn", "--steps", "1"], "--dataset: unknown dataset 'svhn'"),
        (["--preset", "MNIST_VAE"], "preset: unknown network preset 'MNIST_VAE'"),
        (["--preset", "CIFAR10_ResNet_zeros_conditional", "--dataset", "mnist"], "is trained on cifar10, not mnist"),
        (["--dataset", "celeb_a", "--conditional", "--steps", "1"], "celeb_a has no class labels"),
        ([], "--steps: required"),
    ],
)
def test_cli_train_errors_are_clear(argv, msg, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(tmp_path / "x"), "--limit", "32", "--no-progress", *argv])
    assert msg in str(e.value.code)


def test_cli_rejects_an_unknown_architecture(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--arch", "vit", "--out", "x"])
    assert e.value.code == 2 and "invalid choice: 'vit'" in capsys.readouterr().err


def test_cli_trains_the_ddpm_unet_on_the_ddpm_schedule(tmp_path):
    out = tmp_path / "ddpm"
    argv = ["train", "--arch", "ddpm-unet", "--width", "32", "--ch-mult", "1", "--attn", "", "--num-res-blocks", "1",
            "--dropout", "0.1", "--image-size", "8", "--batch-size", "8", "--limit", "16", "--steps", "2",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    net, cfg = training.load_run_config(out)
    assert (net.arch, net.ch_mult, net.attn, net.dropout) == ("ddpm-unet", (1,), (), 0.1)
    assert cfg.schedule == ej.schedules.ddpm_linear() and cfg.time_levels == 1000
    assert all(np.isfinite(r["loss"]) for r in read_metrics(out))
