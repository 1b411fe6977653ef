"""Check ``ellsjax convert`` against real ``torch.save`` files of the authors' own model classes.

Needs torch in *another* Python (ellsjax never imports torch) and the two reference sources, cloned
by you: github.com/Kambm/convolutional_diffusion (its ``models.py``) and
github.com/ottogin/locality-in-diffusion-models (``src/local_diffusion/utils/neural_networks.py``).

1. ``TORCH_PYTHON scripts/check_convert_with_torch.py make --kg-repo K --locality-repo L --dir D``
   builds each network with the reference classes (the ten backbone architectures at the training
   script's sizes, with random weights; the DDPM UNet at 28 and 32 px), perturbs every trainable
   parameter (so no zero bias or unit GroupNorm hides a mapping error), saves it the way the
   authors did (``torch.save(model)`` for the backbones; ``{"model_state_dict": …}`` and a whole
   module for the DDPM UNet) and the network's own ε on fixed inputs (``D/expected.npz``);
2. ``python scripts/check_convert_with_torch.py check --dir D`` (this project's environment)
   converts every file and prints the max relative error of ε against torch's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

# name: (file stem, architecture, channels, padding, conditional)
BACKBONES = {
    "MNIST_ResNet_zeros": ("resnet", 1, "zeros", False),
    "MNIST_ResNet_circular": ("resnet", 1, "circular", False),
    "MNIST_UNet_zeros": ("unet", 1, "zeros", False),
    "FashionMNIST_ResNet_zeros_conditional": ("resnet", 1, "zeros", True),
    "FashionMNIST_UNet_zeros_conditional": ("unet", 1, "zeros", True),
    "CIFAR10_ResNet_zeros_conditional": ("resnet", 3, "zeros", True),
    "CIFAR10_ResNet_circular_conditional": ("resnet", 3, "circular", True),
    "CIFAR10_UNet_zeros_conditional": ("unet", 3, "zeros", True),
    "CelebA_ResNet_zeros": ("resnet", 3, "zeros", False),
    "CelebA_UNet_zeros": ("unet", 3, "zeros", False),
}
DDPM = {  # name: (image size, channels, ch, ch_mult, attn)
    "ddpm_mnist_28": (28, 1, 64, [1, 2, 2], []),
    "ddpm_cifar10_32": (32, 3, 128, [1, 2, 3, 4], []),
    "ddpm_attn_16": (16, 3, 32, [1, 2], [1]),
}


def _load(path: Path, name: str):
    import types

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # pickled classes are named by this module path
    parts = name.split(".")
    for i in range(1, len(parts)):  # bare parent packages (the real ones import the whole project)
        parent = ".".join(parts[:i])
        sys.modules.setdefault(parent, types.ModuleType(parent))
        setattr(sys.modules[parent], parts[i], sys.modules.get(".".join(parts[: i + 1]), mod))
    spec.loader.exec_module(mod)
    return mod


def make(args) -> None:
    import torch

    sys.path.insert(0, str(Path(args.kg_repo)))  # models.py imports utils.noise_schedules
    models = _load(Path(args.kg_repo) / "models.py", "models")
    nn_mod = _load(Path(args.locality_repo) / "src/local_diffusion/utils/neural_networks.py",
                   "local_diffusion.utils.neural_networks")
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    expected = {}

    def perturb(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        return model.eval()

    for name, (arch, c, padding, cond) in BACKBONES.items():
        if arch == "resnet":  # training_script.py: emb_dim 128*mult, kernel 3, lastksize 3 (README: 8 layers)
            net = models.MinimalResNet(channels=c, emb_dim=256, mode=padding, conditional=cond, num_classes=10,
                                       kernel_size=3, num_layers=8, normalization=None, lastksize=3)
        else:  # fsizes mult*32*2^i for 3 layers
            net = models.MinimalUNet(channels=c, fsizes=[64, 128, 256], mode=padding, conditional=cond,
                                     num_classes=10, normalization=None, lastksize=3)
        perturb(net)
        torch.save(net, out / f"backbone_{name}.pt")
        x = torch.randn(2, c, 32, 32)
        t = torch.tensor([0.05, 0.7])
        label = torch.tensor([3, 9]) if cond else None
        with torch.no_grad():
            eps = net(t, x, label=label)
        expected[name] = dict(x=x.numpy(), t=t.numpy(), eps=eps.numpy(), label=None if label is None else label.numpy())
    for name, (size, c, ch, mult, attn) in DDPM.items():
        net = perturb(nn_mod.UNet(T=1000, ch=ch, ch_mult=mult, attn=attn, num_res_blocks=2, dropout=0.15,
                                  in_channels=c, out_channels=c))
        torch.save({"model_state_dict": net.state_dict(), "epoch": 200}, out / f"{name}.pt")
        torch.save(net, out / f"{name}_module.pt")
        x = torch.randn(2, c, size, size)
        step = torch.tensor([0, 517])
        with torch.no_grad():
            eps = net(x, step)
        expected[name] = dict(x=x.numpy(), t=((step.numpy() + 1) / 1000), eps=eps.numpy(), label=None)
    flat = {f"{k}/{f}": v for k, d in expected.items() for f, v in d.items() if v is not None}
    np.savez(out / "expected.npz", **flat)
    print(f"wrote {len(BACKBONES) + 2 * len(DDPM)} checkpoints and expected.npz to {out} (torch {torch.__version__})")


def check(args) -> None:
    import time

    import jax.numpy as jnp

    import ellsjax as ej

    d = Path(args.dir)
    exp = np.load(d / "expected.npz")
    files = [(f"backbone_{n}.pt", n, {"preset": n}) for n in BACKBONES]
    for n, (size, *_rest) in DDPM.items():
        files += [(f"{n}.pt", n, {"image_size": size, "dataset": "cifar10"}),
                  (f"{n}_module.pt", n, {"image_size": size, "dataset": "cifar10"})]
    rows = []
    for fname, key, opts in files:
        t0 = time.perf_counter()
        conv = ej.convert.from_torch(d / fname, **opts)
        secs = time.perf_counter() - t0
        model = ej.models.from_module(conv.module(), conv.net, schedule=conv.schedule)
        x = exp[f"{key}/x"]
        label = exp[f"{key}/label"] if f"{key}/label" in exp else None
        eps = np.asarray(model.eps(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(exp[f"{key}/t"], jnp.float32),
                                   label=label)).transpose(0, 3, 1, 2)
        want = exp[f"{key}/eps"]
        err = float(np.max(np.abs(eps - want)) / np.max(np.abs(want)))
        row = {"file": fname, "class": conv.info["source_class"], "arch": conv.net.arch, "depth": conv.net.depth,
               "width": conv.net.width, "from_torch_s": round(secs, 2), "max_rel_err": err}
        print(json.dumps(row), flush=True)
        rows.append(row)
    worst = max(r["max_rel_err"] for r in rows)
    print(f"worst max relative error of eps: {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    m = sub.add_parser("make")
    m.add_argument("--kg-repo", required=True)
    m.add_argument("--locality-repo", required=True)
    m.add_argument("--dir", required=True)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    args = ap.parse_args()
    (make if args.stage == "make" else check)(args)


if __name__ == "__main__":
    main()
