"""Converting the released PyTorch networks: the restricted reader, every backbone architecture and
the DDPM UNet against float64 numpy forwards of the reference definitions, the run directory, errors.

Nothing is downloaded: the checkpoints are written here, in torch's on-disk layout, from known
arrays (tests/_torchwriter.py), with tiny widths at the paper's 32x32 (Kamb & Ganguli) or 8x8.
"""

import dataclasses
import json
import os
import pickle
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ellsjax as ej
from ellsjax import cli
from tests import _torchnets as tn
from tests import _torchwriter as tw

RNG = np.random.default_rng(7)


@partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, label):
    return nnx.merge(graphdef, state)(x, t, label)


def _eps(conv, x_nchw, t, label):
    """The converted network's ε̂ on NCHW inputs (returned NCHW)."""
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
    lab = None if label is None else jnp.asarray(label)
    return np.asarray(_apply(conv.graphdef, conv.state, x, jnp.asarray(t, jnp.float32), lab)).transpose(0, 3, 1, 2)


def _max_rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _f64(sd):
    return {k: v.astype(np.float64) for k, v in sd.items()}


# The ten released backbones (github.com/Kambm/convolutional_diffusion files/backbone_<NAME>.pt):
# each is written as a whole pickled module of its architecture, at tiny widths.
BACKBONES = ["MNIST_ResNet_zeros", "MNIST_ResNet_circular", "MNIST_UNet_zeros",
             "FashionMNIST_ResNet_zeros_conditional", "FashionMNIST_UNet_zeros_conditional",
             "CIFAR10_ResNet_zeros_conditional", "CIFAR10_ResNet_circular_conditional",
             "CIFAR10_UNet_zeros_conditional", "CelebA_ResNet_zeros", "CelebA_UNet_zeros"]


def _kg_case(name, seed):
    """(state dict, pickled module, numpy forward(sd, t, x, label), channels, labels or None)."""
    p = ej.nets.preset(name).net
    ncls = 10 if p.conditional else None
    if p.arch == "resnet":
        sd = tn.kg_resnet_sd(seed, channels=p.channels, dim=16, layers=2, num_classes=ncls)
        obj = tn.module_tree(sd, "models.MinimalResNet", padding_mode=p.padding, channels=p.channels, emb_dim=16,
                             mode=p.padding, conditional=p.conditional, num_layers=2, lastksize=3)
        ref = partial(tn.kg_resnet, mode=p.padding, num_layers=2)
    else:
        sd = tn.kg_unet_sd(seed, channels=p.channels, fsizes=[8, 16, 32], emb=16, num_classes=ncls)
        obj = tn.module_tree(sd, "models.MinimalUNet", padding_mode=p.padding, fsizes=[8, 16, 32], channels=p.channels)
        ref = partial(tn.kg_unet, mode=p.padding, levels=3)
    return sd, obj, ref, p.channels, (np.array([3, 9]) if p.conditional else None)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_architecture_converts_and_matches_the_reference(name, tmp_path):
    sd, obj, ref, c, label = _kg_case(name, BACKBONES.index(name))
    path = tmp_path / f"backbone_{name}.pt"
    tw.save(obj, path)
    conv = ej.convert.from_torch(path, preset=name)
    assert conv.net.padding == ej.nets.preset(name).net.padding and conv.net.image_size == 32
    assert conv.info["source_class"] in ("models.MinimalResNet", "models.MinimalUNet")
    assert conv.schedule == ej.schedules.cosine_legacy()
    x, t = RNG.standard_normal((2, c, 32, 32)), np.array([0.05, 0.7])
    want = ref(_f64(sd), t, x, label)
    assert _max_rel(_eps(conv, x, t, label), want) < 2e-5


@pytest.mark.parametrize("arch", ["resnet", "unet"])
def test_state_dicts_with_group_norm_and_the_other_options_convert(arch, tmp_path):
    # a state dict (no padding recorded: --padding), GroupNorm, the ResNet without add_one and a
    # 1x1 last conv, the UNet with 5x5 convs (its up blocks stay 3x3, as in models.py)
    if arch == "resnet":
        sd = tn.kg_resnet_sd(11, channels=3, dim=16, layers=2, num_classes=4, add_one=False, norm=True, lastk=1)
        ref = partial(tn.kg_resnet, mode="circular", num_layers=2, norm=True)
    else:
        sd = tn.kg_unet_sd(12, channels=1, fsizes=[32, 64], emb=16, k=5, norm=True, num_classes=4)
        ref = partial(tn.kg_unet, mode="circular", levels=2, norm=True)
    path = tmp_path / "sd.pt"
    tw.save({"model_state_dict": tw.state_dict(sd)}, path)
    with pytest.raises(ValueError, match="padding: the file does not record .* pass --padding"):
        ej.convert.from_torch(path, image_size=8, dataset="mnist")
    conv = ej.convert.from_torch(path, image_size=8, padding="circular", dataset="mnist")
    n = conv.net
    assert n.norm == "group" and n.conditional and n.num_classes == 4
    assert (n.add_one, n.out_kernel_size) == (False, 1) if arch == "resnet" else n.kernel_size == 5
    c = n.channels
    x, t, label = RNG.standard_normal((2, c, 8, 8)), np.array([0.3, 0.95]), np.array([0, 3])
    assert _max_rel(_eps(conv, x, t, label), ref(_f64(sd), t, x, label)) < 2e-5


@pytest.mark.parametrize("attn", [(), (1,)], ids=["middle-attention-only", "attention-at-level-1"])
def test_ddpm_unet_converts_and_matches_the_reference(attn, tmp_path):
    sd = tn.ddpm_unet_sd(3, channels=1, ch=32, ch_mult=(1, 2), attn=attn, num_res_blocks=1)
    path = tmp_path / "ckpt_epoch_200.pt"
    if attn:  # a whole pickled module (torch.save(model)) of the locality repo's class
        tw.save(tn.module_tree(sd, "local_diffusion.utils.neural_networks.UNet", padding_mode="zeros"), path)
    else:  # the released layout
        tw.save({"model_state_dict": tw.state_dict(sd), "epoch": 200}, path)
    conv = ej.convert.from_torch(path, image_size=8, dataset="mnist")
    assert conv.info["source_class"] == ("local_diffusion.utils.neural_networks.UNet" if attn else "state dict")
    n = conv.net
    assert (n.arch, n.width, n.ch_mult, n.attn, n.num_res_blocks, n.time_steps) == ("ddpm-unet", 32, (1, 2), attn, 1, 1000)
    assert conv.schedule == ej.schedules.ddpm_linear()
    steps = np.array([0, 517])
    x = RNG.standard_normal((2, 1, 8, 8))
    got = _eps(conv, x, (steps + 1) / 1000, None)  # step i is t = (i+1)/1000
    assert _max_rel(got, tn.ddpm_unet(_f64(sd), x, steps)) < 2e-5


def test_convert_writes_a_run_the_tools_load(tmp_path, capsys):
    sd = tn.ddpm_unet_sd(4, channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1)
    path = tmp_path / "ddpm.pt"
    tw.save({"model_state_dict": tw.state_dict(sd)}, path)
    out = tmp_path / "run"
    assert cli.main(["convert", str(path), "--out", str(out), "--image-size", "8", "--dataset", "mnist"]) == 0
    assert "ddpm-unet on 8x8x1 mnist images" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    rec = cfg["converted_from"]
    assert rec["file"] == "ddpm.pt" and rec["origin"]["image_size"] == "option" and "t = (i+1)/1000" in rec["time"]
    model = ej.models.load(out)  # the forward itself is checked against the reference above
    assert model.schedule == ej.schedules.ddpm_linear() and model.config.ch_mult == (1,)
    direct = ej.convert.from_torch(path, image_size=8, dataset="mnist")
    for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(direct.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert cli_error(["convert", str(path), "--out", str(out), "--image-size", "8", "--dataset", "mnist"]).endswith(
        "already holds a run; choose another directory")


def test_a_pickle_naming_an_unknown_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "created-by-the-pickle"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    tw.save({"model_state_dict": Payload()}, path)
    with pytest.raises(ej.convert.UnsafeCheckpointError, match=r"names the global posix\.mkdir.*not imported"):
        ej.convert.read_torch(path)
    assert not marker.exists()
    # also for a class outside torch.nn and the known model definitions
    tw.save(tw.module("mypackage.Net"), path)
    with pytest.raises(pickle.UnpicklingError, match="mypackage.Net"):
        ej.convert.read_torch(path)
    assert cli_error(["convert", str(path), "--out", str(tmp_path / "o")]).startswith("ellsjax: error: checkpoint:")


def test_a_pickle_cannot_change_the_readers_functions(tmp_path):
    # BUILD on a global sets attributes on it: here __defaults__ of the tensor-rebuild function
    raw = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.NONE
           + pickle.EMPTY_DICT + pickle.BINUNICODE + len(b"__defaults__").to_bytes(4, "little") + b"__defaults__"
           + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.TUPLE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD
           + pickle.STOP)
    path = tmp_path / "patch.pt"
    tw.save(None, path, raw_pickle=raw)
    got = ej.convert.read_torch(path)
    assert got.__defaults__ == (1,)  # this read's own copy
    from ellsjax import _torchfile

    assert _torchfile._tensor.__defaults__ is None and _torchfile._FUNCTIONS[("torch._utils", "_rebuild_tensor_v2")] \
        is _torchfile._tensor


def cli_error(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return str(e.value)


def test_missing_keys_and_missing_settings_are_named(tmp_path):
    sd = tn.kg_resnet_sd(5, channels=1, dim=16, layers=2)
    path = tmp_path / "backbone_MNIST_ResNet_zeros.pt"
    broken = {k: v for k, v in sd.items() if k != "convs.1.0.bias"}
    tw.save(tn.module_tree(broken, "models.MinimalResNet", padding_mode="zeros"), path)
    with pytest.raises(ValueError, match=r"state dict: missing 'convs\.1\.0\.bias'"):
        ej.convert.from_torch(path, preset="MNIST_ResNet_zeros")
    tw.save(tn.module_tree(sd, "models.MinimalResNet", padding_mode="zeros"), path)
    # a file never records the image size; the error suggests the preset its name matches
    with pytest.raises(ValueError, match="image_size: .* pass --image-size or --preset .*--preset MNIST_ResNet_zeros"):
        ej.convert.from_torch(path, dataset="mnist")
    with pytest.raises(ValueError, match="preset: MNIST_ResNet_circular has padding='circular' but the file's"):
        ej.convert.from_torch(path, preset="MNIST_ResNet_circular")
    with pytest.raises(ValueError, match="channels: the file's network has channels=1, not 3"):
        ej.convert.from_torch(path, preset="MNIST_ResNet_zeros", channels=3)
    with pytest.raises(ValueError, match="dataset: preset MNIST_ResNet_zeros has dataset='mnist', not 'cifar10'"):
        ej.convert.from_torch(path, preset="MNIST_ResNet_zeros", dataset="cifar10")
    extra = {**sd, "embs.9.0.weight": np.zeros((16, 16), np.float32)}
    tw.save({"model_state_dict": tw.state_dict(extra)}, path)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['embs\.9\.0\.weight'\]"):
        ej.convert.from_torch(path, preset="MNIST_ResNet_zeros")


def test_an_experiment_converts_its_weights_once_and_checks_them(tmp_path):
    sd = tn.kg_resnet_sd(6, channels=1, dim=16, layers=2)
    path = tmp_path / "backbone.pt"
    tw.save(tn.module_tree(sd, "models.MinimalResNet", padding_mode="circular"), path)
    want = ej.nets.NetConfig(arch="resnet", image_size=8, width=16, depth=4, padding="circular")
    train = ej.training.TrainConfig(steps=1, dataset="mnist", limit=32)
    lines = []
    net = ej.convert.network_run(path, tmp_path / "net", net=want, train=train, log=lines.append)
    assert (net.depth, net.image_size, net.padding) == (2, 8, "circular")  # the file's own depth
    assert ej.convert.network_run(path, tmp_path / "net", net=want, train=train, log=lines.append) == net
    assert "converted backbone.pt" in lines[0] and "using the network converted before" in lines[1]
    other = tmp_path / "other.pt"
    tw.save(tn.module_tree(tn.kg_resnet_sd(7, channels=1, dim=16, layers=2), "models.MinimalResNet", padding_mode="circular"),
            other)
    with pytest.raises(ValueError, match="weights: .* already holds another network"):
        ej.convert.network_run(other, tmp_path / "net", net=want, train=train)
    with pytest.raises(ValueError, match="padding: the file's network has padding='circular', not 'zeros'"):
        ej.convert.network_run(path, tmp_path / "net2", net=dataclasses.replace(want, padding="zeros"), train=train)
