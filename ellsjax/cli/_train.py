"""``ellsjax train``: train one of the paper's convolutional diffusion networks (ResNet or UNet) on
a dataset, writing orbax checkpoints, ``config.json`` and ``metrics.jsonl`` to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses

from ellsjax.cli._common import HelpFormatter, claim_outputs, cli_message, output_dir
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "celeb_a": 3}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
# flag -> NetConfig field, for flags that describe the network
_NET_FLAGS = {"arch": "arch", "padding": "padding", "width": "width", "depth": "depth", "image_size": "image_size",
              "norm": "norm", "kernel_size": "kernel_size", "ch_mult": "ch_mult", "attn": "attn",
              "num_res_blocks": "num_res_blocks", "dropout": "dropout"}
# flag -> TrainConfig field that a resumed run must keep
_FIXED_TRAIN_FLAGS = {"batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay", "lr_decay": "lr_decay",
                      "ema": "ema_decay", "seed": "seed", "dataset": "dataset", "source": "source", "path": "path",
                      "data_dir": "data_dir", "split": "split", "limit": "limit"}
# library argument names in messages -> the flags that set them
_MESSAGE_FLAGS = {**{field: f"--{flag.replace('_', '-')}" for flag, field in
                     {**_NET_FLAGS, **_FIXED_TRAIN_FLAGS}.items()},
                  "ema_decay": "--ema", "out_dir": "--out", "name": "--dataset", "steps": "--steps", "preset": "--preset",
                  "log_every": "--log-every", "checkpoint_every": "--checkpoint-every",
                  "keep_checkpoints": "--keep-checkpoints"}
_LENGTH_FLAGS = {"steps": "steps", "log_every": "log_every", "checkpoint_every": "checkpoint_every",
                 "keep_checkpoints": "keep_checkpoints"}


def register(sub) -> None:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "train",
        help="train a convolutional diffusion network (the paper's ResNet or UNet) on a dataset",
        description=(
            "Train a paper-style convolution-only diffusion network with the eps-prediction loss, AdamW and the "
            "paper's cosine schedule. Writes OUT/config.json, OUT/metrics.jsonl (one JSON line per logged step) "
            "and orbax checkpoints under OUT/checkpoints; --resume continues exactly where a run stopped; Ctrl-C "
            "(SIGINT) and `kill` (SIGTERM, what SLURM, Kubernetes and preemptible VMs send) save a checkpoint and "
            "exit; a NaN or infinite loss stops the run with an error naming the step (its checkpoints hold only "
            "finite weights). A progress bar shows the steps. Sample from the result with `ellsjax sample --model OUT`. "
            "Unset network options take the preset's (--preset) or the paper's defaults (ResNet: width 256, "
            "8 layers; UNet: width 64, 3 levels)."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--preset", default=None, metavar="NAME",
                   help="one of the paper's networks (ellsjax.nets.PRESETS), named like the scale presets: "
                        "MNIST_ResNet_zeros, MNIST_ResNet_circular, MNIST_UNet_zeros, MNIST_UNet_circular, "
                        "FashionMNIST_{ResNet,UNet}_zeros_conditional, CIFAR10_ResNet_zeros_conditional, "
                        "CIFAR10_ResNet_circular_conditional, CIFAR10_UNet_zeros_conditional, "
                        "CelebA_{ResNet,UNet}_zeros; other options override the preset's")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (its config.json fixes the network "
                        "and data; --steps may extend it); an --out that holds no run is an error")
    g = s.add_argument_group("network")
    g.add_argument("--arch", choices=("resnet", "unet", "ddpm-unet"), default=None,
                   help="architecture (default: resnet); ddpm-unet is Ho et al.'s UNet (the locality papers' baseline), "
                        "trained on the linear-beta DDPM schedule")
    g.add_argument("--padding", choices=("zeros", "circular"), default=None, help="conv padding (default: zeros)")
    g.add_argument("--conditional", action="store_true", default=None, help="class-conditional network")
    g.add_argument("--width", type=int, default=None, help="ResNet channels / UNet first-level features")
    g.add_argument("--depth", type=int, default=None, help="ResNet residual layers / UNet levels")
    g.add_argument("--image-size", type=int, default=None, help="train at SxS (default 32, as in the paper)")
    g.add_argument("--norm", choices=("group",), default=None, help="GroupNorm after every conv (default: none)")
    g.add_argument("--kernel-size", type=int, default=None, help="odd conv kernel size (default 3)")
    g.add_argument("--ch-mult", type=_int_tuple, default=None, metavar="M,M,...",
                   help="ddpm-unet: width multiplier per level (default 1,2,2,2)")
    g.add_argument("--attn", type=_int_tuple, default=None, metavar="L,...",
                   help="ddpm-unet: levels with self-attention ('' for none; the middle block always has one)")
    g.add_argument("--num-res-blocks", type=int, default=None, help="ddpm-unet: residual blocks per level (default 2)")
    g.add_argument("--dropout", type=float, default=None, help="ddpm-unet: dropout rate in training (default 0)")
    g = s.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None,
                   help="total optimizer updates (default with --preset: the paper's 300 epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="images per update (default 128)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    g.add_argument("--lr-decay", type=float, default=None, help="per-update learning-rate decay (default 0.999965)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)")
    g.add_argument("--seed", type=int, default=None, help="initialization, noise and data-order seed (default 0)")
    g.add_argument("--log-every", type=int, default=None, help="metrics line every N updates (default 50)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N updates (default 1000)")
    g.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints kept (default 3)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = s.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="mnist, fashion_mnist, cifar10 or celeb_a (default: mnist)")
    g.add_argument("--source", default=None, choices=("bundled", "npz", "idx", "tfds", "auto"),
                   help="where the images come from (see ellsjax.data.load; default: bundled)")
    g.add_argument("--path", default=None, help="file or directory for --source npz/idx")
    g.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for --source tfds")
    g.add_argument("--split", default=None, help="dataset split (default: train)")
    g.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    s.set_defaults(func=_cmd_train)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    """The options among ``flags`` set on the command line, keyed by config field."""
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from ellsjax import training
    from ellsjax._io import OutputError

    if args.resume and not (Path(args.out) / training.CONFIG_FILE).is_file():
        what = "does not exist" if not Path(args.out).exists() else f"holds no training run (no {training.CONFIG_FILE})"
        _fail(f"--resume: {args.out} {what}; check the path, or drop --resume to start a new run there")
    out = output_dir(args.out)
    claim_outputs(out, [], overwrite=True)  # one process per run directory (a run is protected by train itself)
    try:
        if args.resume:
            net, cfg = _resumed_configs(args, out)
            data = None
        else:
            net, cfg, data = _fresh_configs(args)
        result = training.train(out, net, cfg, data=data, resume=args.resume, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        _fail(cli_message(str(e), _MESSAGE_FLAGS))
    except OutputError as e:  # a checkpoint that could not be written (a full disk): already one line
        _fail(f"--out: {e}")
    except OSError as e:  # a full disk or a vanished directory while writing the metrics or config
        where = f" {e.filename}" if getattr(e, "filename", None) else f" in {out}"
        _fail(f"--out: cannot write{where}: {e.strerror or e}")
    if result.interrupted:
        what = "terminated (SIGTERM)" if result.signal == signal.SIGTERM else "interrupted"
        print(f"{what} at step {result.step}; checkpoint saved in {out}; continue with "
              f"`ellsjax train --out {out} --resume`")
        return 128 + (result.signal or signal.SIGINT)
    loss = "" if result.loss is None else f", last loss {result.loss:.4f}"
    print(f"trained {net.arch} to step {result.step}{loss} -> {out} (sample with `ellsjax sample --model {out}`)")
    return 0


def _resumed_configs(args, out):
    from ellsjax import training

    net, cfg = training.load_run_config(out)
    if args.preset is not None:
        _fail("--preset: a resumed run keeps the network in its config.json; drop --preset")
    wanted = _given(args, _NET_FLAGS)
    if args.conditional is not None:
        wanted["conditional"] = True
    for field, value in wanted.items():
        if getattr(net, field) != value:
            _fail(f"--{field.replace('_', '-')}: the run in {out} has {field}={getattr(net, field)!r}; "
                  "a resumed run keeps its network")
    for field, value in _given(args, _FIXED_TRAIN_FLAGS).items():
        if getattr(cfg, field) != value:
            _fail(f"--{field.replace('_', '-')}: the run in {out} has {field}={getattr(cfg, field)!r}; "
                  "a resumed run keeps its training options (only --steps, --log-every, --checkpoint-every, "
                  "--keep-checkpoints may change)")
    return net, dataclasses.replace(cfg, **_given(args, _LENGTH_FLAGS))


def _fresh_configs(args):
    from ellsjax import nets, training

    preset = nets.preset(args.preset) if args.preset is not None else None
    dataset = args.dataset or (preset.dataset if preset else "mnist")
    if preset is not None and args.dataset is not None and args.dataset != preset.dataset:
        _fail(f"--dataset: preset {args.preset} is trained on {preset.dataset}, not {args.dataset}")
    if dataset not in _CHANNELS:
        _fail(f"--dataset: unknown dataset {dataset!r}; known: {', '.join(_CHANNELS)}")
    conditional = bool(args.conditional) if args.conditional is not None else (preset.net.conditional if preset else False)
    if conditional and dataset not in _NUM_CLASSES:
        _fail(f"--conditional: {dataset} has no class labels")
    base = preset.net if preset is not None else nets.NetConfig(
        arch=args.arch or "resnet", channels=_CHANNELS[dataset], image_size=32
    )
    net_kw = _given(args, _NET_FLAGS)
    # derived fields are re-derived: width/depth when the architecture changes, the ResNet's emb_dim
    # (its width) always
    drop = {"emb_dim"} if net_kw.get("arch", base.arch) == "resnet" else set()
    if preset is None or net_kw.get("arch", base.arch) != base.arch:
        drop |= {"width", "depth", "emb_dim"}
    if net_kw.get("arch", base.arch) == "ddpm-unet":  # depth and embedding follow ch_mult and width
        drop |= {"depth", "emb_dim"}
    base_kw = {k: v for k, v in base.to_dict().items() if k not in drop}
    net = nets.NetConfig(**{**base_kw, **net_kw, "conditional": conditional,
                            "num_classes": _NUM_CLASSES.get(dataset) if conditional else None})
    train_kw = {**_given(args, _FIXED_TRAIN_FLAGS), **_given(args, _LENGTH_FLAGS), "dataset": dataset}
    train_kw.pop("steps", None)
    if net.arch == "ddpm-unet":  # the DDPM UNet's time input is a step of the linear-beta schedule
        from ellsjax import schedules

        train_kw.update(schedule=schedules.ddpm_linear(steps=net.time_steps), time_levels=net.time_steps)
    cfg = training.TrainConfig(steps=1, **train_kw)
    images, labels = training.load_data(net, cfg)
    if args.steps is not None:
        steps = args.steps
    elif preset is not None:
        steps = preset.epochs * (images.shape[0] // cfg.batch_size)
    else:
        _fail("--steps: required (or pass --preset for the paper's training length)")
    return net, dataclasses.replace(cfg, steps=steps), (images, labels)
