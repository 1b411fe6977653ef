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

