"""Time ``ellsjax convert`` on full-size networks and check their ε against float64 numpy.

Writes synthetic checkpoints of the released networks' full sizes in torch's layout (random
weights; tests/_torchwriter.py, no torch, nothing downloaded): Kamb & Ganguli's CIFAR-10 ResNet
(width 256, 8 layers, conditional) and UNet (64-128-256), pickled as whole modules, and the
locality papers' DDPM UNets as state dicts (CIFAR-10: ch 128, ch_mult 1,2,3,4 at 32 px; MNIST: ch 64,
ch_mult 1,2,2 at 28 px). For each: the wall time of the ``ellsjax convert`` command (a fresh
process: imports included), the conversion's own time, and the max relative error of ε on two
images against the numpy forward of the reference definition.

    python scripts/bench_convert.py [--only ddpm-cifar10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import _torchnets as tn  # noqa: E402
from tests import _torchwriter as tw  # noqa: E402


def cases():
    lab = np.array([1, 7])
    sd = tn.kg_resnet_sd(0, channels=3, dim=256, layers=8, num_classes=10)
    yield ("kg-resnet-cifar10", tn.module_tree(sd, "models.MinimalResNet", padding_mode="zeros"), sd,
           ["--preset", "CIFAR10_ResNet_zeros_conditional"], 32, 3, lab,
           lambda s, x, t: tn.kg_resnet(s, t, x, lab, mode="zeros", num_layers=8), np.array([0.1, 0.6]))
    sd = tn.kg_unet_sd(1, channels=3, fsizes=[64, 128, 256], emb=256, num_classes=10)
    yield ("kg-unet-cifar10", tn.module_tree(sd, "models.MinimalUNet", padding_mode="zeros"), sd,
           ["--preset", "CIFAR10_UNet_zeros_conditional"], 32, 3, lab,
           lambda s, x, t: tn.kg_unet(s, t, x, lab, mode="zeros", levels=3), np.array([0.1, 0.6]))
    steps = np.array([99, 899])
    sd = tn.ddpm_unet_sd(2, channels=3, ch=128, ch_mult=(1, 2, 3, 4), attn=(), num_res_blocks=2)
    yield ("ddpm-cifar10", {"model_state_dict": tw.state_dict(sd)}, sd, ["--preset", "locality-cifar10"], 32, 3,
           None, lambda s, x, t: tn.ddpm_unet(s, x, steps), (steps + 1) / 1000)
    sd = tn.ddpm_unet_sd(3, channels=1, ch=64, ch_mult=(1, 2, 2), attn=(), num_res_blocks=2)
    yield ("ddpm-mnist-28", {"model_state_dict": tw.state_dict(sd)}, sd,
           ["--image-size", "28", "--dataset", "mnist"], 28, 1, None,
           lambda s, x, t: tn.ddpm_unet(s, x, steps), (steps + 1) / 1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    import jax.numpy as jnp

    import ellsjax as ej

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, obj, sd, opts, size, c, lab, ref, t in cases():
            if args.only and name != args.only:
                continue
            path = Path(d) / f"{name}.pt"
            tw.save(obj, path)
            out = Path(d) / f"run-{name}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ellsjax", "convert", str(path), "--out", str(out), *opts],
                           check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            rec = json.loads((out / "config.json").read_text())["converted_from"]
            model = ej.models.load(out)
            x = np.random.default_rng(0).standard_normal((2, c, size, size))
            got = np.asarray(model.eps(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), jnp.asarray(t, jnp.float32),
                                       label=lab)).transpose(0, 3, 1, 2)
            want = ref({k: v.astype(np.float64) for k, v in sd.items()}, x, t)
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            row = {"case": name, "parameters": rec["parameters"], "file_mb": round(path.stat().st_size / 2**20, 1),
                   "command_s": round(wall, 2), "convert_s": rec["seconds"], "max_rel_err": err}
            print(json.dumps(row), flush=True)
            rows.append(row)


if __name__ == "__main__":
    main()
