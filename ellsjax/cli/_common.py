"""Helpers shared by the subcommands."""

from __future__ import annotations


def fail(msg: str):
    """Stop with a one-line error (exit status 2-like message, no traceback)."""
    raise SystemExit(f"ellsjax: error: {msg}")


def load_network_run(model_dir: str, *, ema: bool = True):
    """``(network, images, labels)``: a trained run's ``Denoiser`` and its own training data.

    Errors name ``--model``."""
    from ellsjax import models, training

    try:
        network = models.load(model_dir, ema=ema)
        net_cfg, train_cfg = training.load_run_config(model_dir)
        images, labels = training.load_data(net_cfg, train_cfg)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        fail(f"--model: {e}")
    return network, images, labels


def seed_labels(network, n: int):
    """Class ids ``0, 1, …, C−1, 0, …`` for ``n`` seeds of a class-conditional network, else ``None``."""
    import numpy as np

    return (np.arange(n) % network.num_classes).astype(np.int32) if network.conditional else None
