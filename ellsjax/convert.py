"""Convert the field's released PyTorch networks into ellsjax runs, without torch.

Two families of published networks are read:

* **Kamb & Ganguli's backbones** (github.com/Kambm/convolutional_diffusion,
  ``files/backbone_*.pt``): whole ``MinimalResNet`` / ``MinimalUNet`` modules pickled with
  ``torch.save(model)``; ε-prediction, ``t ∈ [0, 1]`` fed to the embedding as is, under
  :func:`ellsjax.schedules.cosine_legacy`. Become ``arch="resnet"`` / ``"unet"`` networks.
* **The locality papers' baseline UNet** (github.com/ottogin/locality-in-diffusion-models,
  ``src/local_diffusion/utils/neural_networks.py``; weights ``models/baseline_unet/*/ckpt_*.pt`` of
  huggingface.co/ottogin/locality-diffusion-baselines): Ho et al.'s DDPM UNet as a state dict
  (``{"model_state_dict": …}``), called with an integer step ``i`` of the linear-β schedule.
  Becomes ``arch="ddpm-unet"`` under :func:`ellsjax.schedules.ddpm_linear`, step ``i`` at
  ``t = (i+1)/1000``.

The file is read by a restricted unpickler (:mod:`ellsjax._torchfile`) that builds only arrays,
plain containers and inert records of module classes: nothing the file names is imported or
called. The architecture comes from the file (a module's attributes, a state dict's keys and
shapes); what a file does not record (the image size, the padding of a state dict's convs, the
dataset) comes from the options, and a missing one is an error that names it.

:func:`convert` writes an ordinary run directory (``config.json`` and an orbax checkpoint, the
layout of :func:`ellsjax.training.train`) that :func:`ellsjax.models.load`, ``ellsjax sample
--model``, ``calibrate``, ``evaluate`` take; :func:`from_torch` returns the network in memory.

Example:
    >>> import ellsjax as ej
    >>> sorted(ej.convert.ARCH_OF_CLASS.items())[:2]
    [('MinimalResNet', 'resnet'), ('MinimalUNet', 'unet')]
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ellsjax import _torchfile
from ellsjax import nets as _nets
from ellsjax import schedules as _schedules

__all__ = ["ARCH_OF_CLASS", "Converted", "read_torch", "from_torch", "convert", "network_run", "UnsafeCheckpointError"]

UnsafeCheckpointError = _torchfile.UnsafeCheckpointError

#: The pickled root module's class → ellsjax architecture.
ARCH_OF_CLASS: dict[str, str] = {"MinimalResNet": "resnet", "MinimalUNet": "unet", "UNet": "ddpm-unet"}
# Keys of a checkpoint dict that hold the network's state dict (the locality repo's, pytorch-ddpm's)
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "ema_model", "net_model", "model")
# The DDPM UNet's linear-β schedule (pytorch-ddpm, diffusers' DDIMScheduler in the locality repo)
_DDPM_BETAS = (1e-4, 0.02)


class Converted(NamedTuple):
    """A converted network.

    Attributes:
        net: its :class:`~ellsjax.nets.NetConfig`.
        state: its weights (``nnx.State``, the layout of ``nnx.split(ellsjax.nets.build(net))``).
        graphdef: its structure.
        schedule: the noise schedule it was trained with.
        info: where each setting came from, the source class, the time convention (a JSON-ready dict).
    """

    net: _nets.NetConfig
    state: nnx.State
    graphdef: nnx.GraphDef
    schedule: _schedules.Schedule
    info: dict[str, Any]

    def module(self) -> nnx.Module:
        """The network as an NNX module."""
        return nnx.merge(self.graphdef, self.state)


def read_torch(file: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file into numpy arrays, containers and inert module records (no torch,
    nothing imported or called; see :mod:`ellsjax._torchfile`)."""
    return _torchfile.load(file)


# --------------------------------------------------------------------------- reading the file


def _unwrap(obj: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state_dict, facts)`` of a loaded checkpoint: a module's parameters and the settings its
    attributes record, or a state dict (possibly inside a training checkpoint dict)."""
    if isinstance(obj, _torchfile.TorchObject):
        if obj.type_name == "DDIM" and isinstance(obj.children.get("backbone"), _torchfile.TorchObject):
            obj = obj.children["backbone"]
        facts: dict[str, Any] = {"source_class": obj.qualname}
        if obj.type_name not in ARCH_OF_CLASS:
            raise ValueError(f"file: holds a pickled {obj.qualname}, not one of the known networks "
                             f"({', '.join(ARCH_OF_CLASS)})")
        facts["arch"] = ARCH_OF_CLASS[obj.type_name]
        # (transposed convs always pad with zeros in torch: only the Conv2d modes say anything)
        modes = {m.state["padding_mode"] for m in _walk(obj) if m.type_name == "Conv2d" and "padding_mode" in m.state}
        if len(modes) > 1:
            raise ValueError(f"file: the network mixes conv padding modes {sorted(modes)}; ellsjax uses one")
        if modes:
            facts["padding"] = modes.pop()
        if obj.type_name == "MinimalUNet" and obj.state.get("last_norm"):
            raise ValueError("file: a MinimalUNet with last_norm=True is not supported")
        return obj.state_dict(), facts
    if isinstance(obj, dict):
        for k in _STATE_DICT_KEYS:
            if k in obj and isinstance(obj[k], dict):
                return _unwrap(obj[k])
        bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
        if bad:
            raise ValueError(f"file: a dict that is neither a state dict nor holds one under "
                             f"{', '.join(_STATE_DICT_KEYS)} (keys {sorted(map(str, obj))[:6]})")
        sd = {str(k): v for k, v in obj.items()}
        if sd and all(k.startswith("module.") for k in sd):  # saved from a DataParallel wrapper
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd, {"source_class": "state dict"}
    raise ValueError(f"file: holds a {type(obj).__name__}, not a network module or a state dict")


def _walk(obj: _torchfile.TorchObject):
    yield obj
    for child in obj.children.values():
        if isinstance(child, _torchfile.TorchObject):
            yield from _walk(child)


def _arch_of_keys(sd: dict[str, np.ndarray]) -> str | None:
    if "up_projection.weight" in sd:
        return "resnet"
    if "feature_blocks.0.emb.1.weight" in sd:
        return "unet"
    if "head.weight" in sd and "time_embedding.timembedding.0.weight" in sd:
        return "ddpm-unet"
    return None


class _Params:
    """The state dict, taken key by key: a missing key or a wrong shape is an error naming it, and
    :meth:`finish` reports keys nobody took."""

    def __init__(self, sd: dict[str, np.ndarray]):
        self.sd = dict(sd)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"state dict: missing {key!r}")
        v = self.sd[key]
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise ValueError(f"state dict: {key!r} has shape {tuple(v.shape)}, the architecture needs {tuple(shape)}")
        self.used.add(key)
        return v

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in self.sd if (m := rx.fullmatch(k))})

    def finish(self) -> None:
        extra = sorted(set(self.sd) - self.used)
        if extra:
            raise ValueError(f"state dict: unexpected key(s) {extra[:5]} for this architecture"
                             f"{' …' if len(extra) > 5 else ''}")


def _shape(a: np.ndarray, name: str, ndim: int) -> tuple[int, ...]:
    if a.ndim != ndim:
        raise ValueError(f"state dict: {name!r} has {a.ndim} dimensions, expected {ndim}")
    return tuple(a.shape)


def _square_kernel(w: np.ndarray, name: str) -> int:
    _, _, kh, kw = _shape(w, name, 4)
    if kh != kw:
        raise ValueError(f"state dict: {name!r} has a {kh}x{kw} kernel; ellsjax's convs are square")
    return kh


def _facts_resnet(p: _Params) -> dict[str, Any]:
    w = p.sd.get("up_projection.weight")
    if w is None:
        raise ValueError("state dict: missing 'up_projection.weight'")
    width, channels = _shape(w, "up_projection.weight", 4)[:2]
    depth = p.count(r"convs\.(\d+)\.0\.weight")
    norm = "group" if p.has("convs.0.1.weight") else None
    down = "down_projection.1.weight" if norm else "down_projection.weight"
    if down not in p.sd:
        raise ValueError(f"state dict: missing {down!r}")
    f = {"arch": "resnet", "channels": channels, "width": width, "depth": depth, "norm": norm,
         "kernel_size": _square_kernel(w, "up_projection.weight"),
         "out_kernel_size": _square_kernel(p.sd[down], down),
         "add_one": p.has(f"embs.{depth}.0.weight")}
    f.update(_facts_classes(p))
    return f


def _facts_classes(p: _Params) -> dict[str, Any]:
    key = "embedding.class_embeddings.weight"
    if key in p.sd:
        return {"conditional": True, "num_classes": int(_shape(p.sd[key], key, 2)[0])}
    return {"conditional": False, "num_classes": None}


def _block_layers(p: _Params, prefix: str) -> list[tuple[int, str]]:
    """A UBlock's ``model`` Sequential: ``[(index, "conv" | "norm")]`` from its parameter shapes."""
    out = []
    for j in sorted({int(m.group(1)) for k in p.sd if (m := re.fullmatch(rf"{re.escape(prefix)}model\.(\d+)\.weight", k))}):
        key = f"{prefix}model.{j}"
        if p.has(f"{key}.running_mean"):
            raise ValueError(f"state dict: {key} is a BatchNorm; only GroupNorm (or none) is supported")
        out.append((j, "conv" if p.sd[f"{key}.weight"].ndim == 4 else "norm"))
    return out


def _facts_unet(p: _Params) -> dict[str, Any]:
    n_down = p.count(r"feature_blocks\.(\d+)\.emb\.1\.weight")
    if "bottleneck.emb.1.weight" not in p.sd:
        raise ValueError("state dict: missing 'bottleneck.emb.1.weight'")
    if any(k.startswith("last_normalizer.") for k in p.sd):
        raise ValueError("state dict: a MinimalUNet with last_norm=True is not supported")
    layers = _block_layers(p, "feature_blocks.0.")
    convs = [j for j, kind in layers if kind == "conv"]
    if not convs:
        raise ValueError("state dict: missing 'feature_blocks.0.model.0.weight'")
    w0 = p.sd[f"feature_blocks.0.model.{convs[0]}.weight"]
    fsizes = []
    for prefix in [*(f"feature_blocks.{i}." for i in range(n_down)), "bottleneck."]:
        key = f"{prefix}model.{convs[-1]}.weight"
        if key not in p.sd:
            raise ValueError(f"state dict: missing {key!r}")
        fsizes.append(int(p.sd[key].shape[0]))
    if "output_conv.weight" not in p.sd:
        raise ValueError("state dict: missing 'output_conv.weight'")
    width = fsizes[0]
    if fsizes != [width * 2**i for i in range(len(fsizes))]:
        raise ValueError(f"state dict: UNet features {fsizes}; ellsjax's UNet has width·2^i per level")
    f = {"arch": "unet", "channels": int(w0.shape[1]), "width": width, "depth": len(fsizes),
         "norm": "group" if any(kind == "norm" for _, kind in layers) else None,
         "kernel_size": _square_kernel(w0, f"feature_blocks.0.model.{convs[0]}.weight"),
         "out_kernel_size": _square_kernel(p.sd["output_conv.weight"], "output_conv.weight"),
         "emb_dim": int(_shape(p.sd["feature_blocks.0.emb.1.weight"], "feature_blocks.0.emb.1.weight", 2)[1]),
         "block_depth": len(convs)}
    f.update(_facts_classes(p))
    return f


def _facts_ddpm(p: _Params) -> dict[str, Any]:
    head = p.sd["head.weight"]
    ch, channels = _shape(head, "head.weight", 4)[:2]
    table = p.sd["time_embedding.timembedding.0.weight"]
    steps = int(_shape(table, "time_embedding.timembedding.0.weight", 2)[0])
    mult, attn, blocks, level = [], set(), [0], 0
    for i in range(p.count(r"downblocks\.(\d+)\..*")):
        if p.has(f"downblocks.{i}.main.weight"):
            level += 1
            blocks.append(0)
            continue
        key = f"downblocks.{i}.block1.2.weight"
        if key not in p.sd:
            raise ValueError(f"state dict: missing {key!r}")
        out = int(p.sd[key].shape[0])
        if out % ch:
            raise ValueError(f"state dict: {key!r} has {out} channels, not a multiple of ch = {ch}")
        if blocks[level] == 0:
            mult.append(out // ch)
        blocks[level] += 1
        if p.has(f"downblocks.{i}.attn.proj.weight"):
            attn.add(level)
    if len(set(blocks)) != 1 or not mult:
        raise ValueError(f"state dict: the down levels hold {blocks} residual blocks; the DDPM UNet has the same "
                         "number at every level")
    tail = "tail.2.weight"
    if tail in p.sd and int(p.sd[tail].shape[0]) != channels:
        raise ValueError(f"state dict: the network maps {channels} to {int(p.sd[tail].shape[0])} channels; "
                         "ellsjax's networks predict eps of the input's channels")
    return {"arch": "ddpm-unet", "channels": channels, "width": ch, "depth": len(mult), "ch_mult": tuple(mult),
            "attn": tuple(sorted(attn)), "num_res_blocks": blocks[0], "time_steps": steps, "padding": "zeros"}


# --------------------------------------------------------------------------- filling the network


def _conv(conv: nnx.Conv, p: _Params, key: str, *, transpose: bool = False) -> None:
    w = p.get(f"{key}.weight")
    if transpose:  # torch (in, out, kh, kw), applied unflipped; Flax's ConvTranspose flips it
        kernel = np.transpose(w[:, :, ::-1, ::-1], (2, 3, 0, 1))
    else:  # torch (out, in, kh, kw) -> Flax (kh, kw, in, out); both cross-correlate
        kernel = np.transpose(w, (2, 3, 1, 0))
    _set(conv.kernel, kernel, f"{key}.weight")
    _set(conv.bias, p.get(f"{key}.bias"), f"{key}.bias")


def _linear(lin: nnx.Linear, p: _Params, key: str) -> None:
    _set(lin.kernel, p.get(f"{key}.weight").T, f"{key}.weight")
    _set(lin.bias, p.get(f"{key}.bias"), f"{key}.bias")


def _norm(norm: nnx.GroupNorm, p: _Params, key: str) -> None:
    _set(norm.scale, p.get(f"{key}.weight"), f"{key}.weight")
    _set(norm.bias, p.get(f"{key}.bias"), f"{key}.bias")


def _set(var: nnx.Variable, value: np.ndarray, name: str) -> None:
    want = tuple(var.get_value().shape)
    if tuple(value.shape) != want:
        raise ValueError(f"state dict: {name!r} has shape {tuple(value.shape)} after conversion, the network "
                         f"needs {want}")
    var.set_value(jnp.asarray(np.ascontiguousarray(value), jnp.float32))


def _classes(model, p: _Params) -> None:
    if model.embed.classes is not None:
        _set(model.embed.classes.embedding, p.get("embedding.class_embeddings.weight"),
             "embedding.class_embeddings.weight")


def _fill_resnet(m: _nets.ResNet, p: _Params) -> None:
    c = m.config
    _classes(m, p)
    _conv(m.up, p, "up_projection")
    for i, layer in enumerate(m.layers):
        _linear(layer.emb.linear, p, f"embs.{i}.0")
        _norm(layer.emb.norm, p, f"embs.{i}.1")
        _conv(layer.conv, p, f"convs.{i}.0")
        if layer.norm is not None:
            _norm(layer.norm, p, f"convs.{i}.1")
    if m.last_emb is not None:
        _linear(m.last_emb.linear, p, f"embs.{c.depth}.0")
        _norm(m.last_emb.norm, p, f"embs.{c.depth}.1")
    if m.out_norm is not None:
        _norm(m.out_norm, p, "down_projection.0")
        _conv(m.down, p, "down_projection.1")
    else:
        _conv(m.down, p, "down_projection")


def _fill_ublock(b, p: _Params, prefix: str) -> None:
    _linear(b.emb, p, f"{prefix}emb.1")
    layers = _block_layers(p, prefix)
    convs = [j for j, kind in layers if kind == "conv"]
    norms = [j for j, kind in layers if kind == "norm"]
    if len(convs) != len(b.convs) or len(norms) != (0 if b.norms is None else len(b.norms)):
        raise ValueError(f"state dict: {prefix}model holds {len(convs)} conv(s) and {len(norms)} norm(s); the "
                         f"architecture needs {len(b.convs)} and {0 if b.norms is None else len(b.norms)}")
    for conv, j in zip(b.convs, convs):
        _conv(conv, p, f"{prefix}model.{j}")
    for norm, j in zip(b.norms or (), norms):
        _norm(norm, p, f"{prefix}model.{j}")


def _fill_unet(m: _nets.UNet, p: _Params) -> None:
    _classes(m, p)
    for i, b in enumerate(m.down_blocks):
        _fill_ublock(b, p, f"feature_blocks.{i}.")
    _fill_ublock(m.bottleneck, p, "bottleneck.")
    for i, (up, b) in enumerate(zip(m.ups, m.up_blocks)):
        _conv(up, p, f"upsamples.{i}", transpose=True)
        _fill_ublock(b, p, f"output_blocks.{i}.")
    _linear(m.last_emb, p, "last_emb.1")
    _conv(m.out, p, "output_conv")


def _fill_resblock(b, p: _Params, prefix: str) -> None:
    _norm(b.norm1, p, f"{prefix}block1.0")
    _conv(b.conv1, p, f"{prefix}block1.2")
    _linear(b.temb, p, f"{prefix}temb_proj.1")
    _norm(b.norm2, p, f"{prefix}block2.0")
    _conv(b.conv2, p, f"{prefix}block2.3")
    if b.shortcut is not None:
        _conv(b.shortcut, p, f"{prefix}shortcut")
    if b.attn is not None:
        a = b.attn
        _norm(a.norm, p, f"{prefix}attn.group_norm")
        for conv, name in ((a.q, "proj_q"), (a.k, "proj_k"), (a.v, "proj_v"), (a.proj, "proj")):
            _conv(conv, p, f"{prefix}attn.{name}")


def _fill_ddpm(m: _nets.DDPMUNet, p: _Params) -> None:
    c = m.config
    key = "time_embedding.timembedding.0.weight"
    table = p.get(key, (c.time_steps, c.width))
    err = float(np.max(np.abs(table.astype(np.float64) - _nets.ddpm_time_table(c.time_steps, c.width))))
    # float32 sin/cos of arguments up to T differ by a few ulps between libraries
    if err > 1e-4:
        raise ValueError(f"state dict: {key!r} is not the sinusoidal table of {c.time_steps} steps (max "
                         f"difference {err:.2e}); a learned time table is not supported")
    _linear(m.time1, p, "time_embedding.timembedding.1")
    _linear(m.time2, p, "time_embedding.timembedding.3")
    _conv(m.head, p, "head")
    for i, b in enumerate(m.down):
        if isinstance(b, _nets._Down):
            _conv(b.conv, p, f"downblocks.{i}.main")
        else:
            _fill_resblock(b, p, f"downblocks.{i}.")
    for i, b in enumerate(m.middle):
        _fill_resblock(b, p, f"middleblocks.{i}.")
    for i, b in enumerate(m.up):
        if isinstance(b, _nets._Up):
            _conv(b.conv, p, f"upblocks.{i}.main")
        else:
            _fill_resblock(b, p, f"upblocks.{i}.")
    _norm(m.tail_norm, p, "tail.0")
    _conv(m.tail, p, "tail.2")


_FACTS = {"resnet": _facts_resnet, "unet": _facts_unet, "ddpm-unet": _facts_ddpm}
_FILL = {"resnet": _fill_resnet, "unet": _fill_unet, "ddpm-unet": _fill_ddpm}


# --------------------------------------------------------------------------- options


def preset_facts(name: str, network: Any = None, dataset: str | None = None) -> dict[str, Any]:
    """What a preset says about a network: a paper network by name (:data:`ellsjax.nets.PRESETS`), or
    a named :class:`~ellsjax.nets.NetConfig` (``network``, e.g. a locality protocol run's DDPM UNet,
    with the ``dataset`` it trains on: the command line looks those up in
    :data:`ellsjax.locality.PRESETS`)."""
    if network is not None:
        return {"arch": network.arch, "channels": network.channels, "image_size": network.image_size,
                **({"dataset": dataset} if dataset is not None else {})}
    if name in _nets.PRESETS:
        p = _nets.PRESETS[name]
        n = p.net
        return {"arch": n.arch, "channels": n.channels, "image_size": n.image_size, "padding": n.padding,
                "conditional": n.conditional, "num_classes": n.num_classes, "dataset": p.dataset}
    raise ValueError(f"preset: unknown preset {name!r}; known paper networks: {', '.join(sorted(_nets.PRESETS))} "
                     "(the command line also knows the locality presets)")


def _merge(file_facts: dict[str, Any], given: dict[str, Any], preset_facts: dict[str, Any],
           preset: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings and where each came from: the file's facts, then the explicit options, then the
    preset's; an option or a preset that contradicts the file, or an option that contradicts the
    preset, is an error."""
    out, origin = dict(file_facts), {k: "file" for k in file_facts}
    for name, value in given.items():
        if value is None:
            continue
        if name in file_facts and file_facts[name] != value:
            raise ValueError(f"{name}: the file's network has {name}={file_facts[name]!r}, not {value!r}")
        if name in preset_facts and preset_facts[name] != value:
            raise ValueError(f"{name}: preset {preset} has {name}={preset_facts[name]!r}, not {value!r}")
        if name not in out:
            out[name], origin[name] = value, "option"
    for name, value in preset_facts.items():
        if name in file_facts:
            if file_facts[name] != value:
                raise ValueError(f"preset: {preset} has {name}={value!r} but the file's network has "
                                 f"{name}={file_facts[name]!r}")
        elif name not in out:
            out[name], origin[name] = value, f"preset {preset}"
    return out, origin


def _suggest_preset(file: Any) -> str:
    stem = Path(str(file)).stem
    name = stem[len("backbone_"):] if stem.startswith("backbone_") else stem
    return f" (e.g. --preset {name})" if name in _nets.PRESETS else ""


def from_torch(
    file: str | os.PathLike,
    *,
    arch: str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    padding: str | None = None,
    dataset: str | None = None,
    preset_network: Any = None,
) -> Converted:
    """Read a released PyTorch network into an ellsjax network (in memory).

    Args:
        file: a ``torch.save`` file: a pickled ``MinimalResNet`` / ``MinimalUNet`` / DDPM ``UNet``
            module, or a state dict of one (bare, or under ``model_state_dict``).
        arch: ``"resnet"``, ``"unet"`` or ``"ddpm-unet"``, for a state dict whose keys do not say
            (checked against the file otherwise).
        preset: a paper network (``"MNIST_ResNet_zeros"`` …, :data:`ellsjax.nets.PRESETS`), or the
            name of ``preset_network``: supplies the image size, dataset and, for a state dict,
            padding.
        image_size: the side of the images the network was trained on (a file never records it).
        channels: image channels (checked against the file).
        padding: ``"zeros"`` or ``"circular"`` (a state dict does not record it).
        dataset: the :func:`ellsjax.data.load` name it was trained on (recorded for the tools that
            load the run's data).
        preset_network: the :class:`~ellsjax.nets.NetConfig` a non-paper ``preset`` names (e.g. a
            locality run's, ``ellsjax.locality.PRESETS[name].net``), with ``dataset`` its data.

    Returns:
        A :class:`Converted`.

    Raises:
        UnsafeCheckpointError: the pickle names a global that is not a tensor, container or known
            module class (it was not imported).
        ValueError: an unsupported or inconsistent file, a missing or extra state-dict key, or a
            setting the file lacks and no option gives (the message names the option).
    """
    sd, facts = _unwrap(_torchfile.load(file))
    key_arch = _arch_of_keys(sd)
    if key_arch is None:
        raise ValueError(f"file: the state dict's keys ({sorted(sd)[:4]} …) match no known network "
                         f"(Kamb & Ganguli's MinimalResNet / MinimalUNet, the DDPM UNet)")
    if "arch" in facts and facts["arch"] != key_arch:
        raise ValueError(f"file: a {facts['source_class']} whose parameters are those of a {key_arch}")
    p = _Params(sd)
    facts.update(_FACTS[key_arch](p))
    source_class = facts.pop("source_class")
    if arch is not None and arch not in _nets.ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; known: {', '.join(_nets.ARCHS)}")
    given = {"arch": arch, "image_size": image_size, "channels": channels, "padding": padding, "dataset": dataset}
    pf = preset_facts(preset, preset_network, dataset) if preset is not None else {}
    settings, origin = _merge(facts, given, pf, preset)
    hint = _suggest_preset(file)
    for name, flag in (("image_size", "--image-size"), ("padding", "--padding"), ("dataset", "--dataset")):
        if name not in settings:
            what = {"image_size": "the image size the network was trained at",
                    "padding": "the padding mode of its convs (a state dict does not record it)",
                    "dataset": "the dataset it was trained on"}[name]
            raise ValueError(f"{name}: the file does not record {what}; pass {flag} or --preset{hint}")
    dataset = settings.pop("dataset")
    net = _nets.NetConfig(**settings)
    model = nnx.eval_shape(lambda: _nets.build(net, rngs=nnx.Rngs(0)))
    _FILL[net.arch](model, p)
    p.finish()
    left = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
            if isinstance(v, jax.ShapeDtypeStruct)]
    if left:
        raise ValueError(f"state dict: nothing in the file fills {left[:3]}")
    graphdef, state = nnx.split(model)
    if net.arch == "ddpm-unet":
        schedule = _schedules.ddpm_linear(*_DDPM_BETAS, steps=net.time_steps)
        time_rule = (f"the network's step i = t*{net.time_steps} - 1 (t = (i+1)/{net.time_steps}) under ddpm_linear "
                     f"(beta {_DDPM_BETAS[0]} to {_DDPM_BETAS[1]}); eps-prediction")
    else:
        schedule = _schedules.cosine_legacy()
        time_rule = "t in [0, 1] fed to the sinusoidal embedding as is, under cosine_legacy; eps-prediction"
    info = {"source_class": source_class, "dataset": dataset, "origin": origin, "time": time_rule,
            "parameters": int(sum(v.size for v in sd.values()))}
    return Converted(net, state, graphdef, schedule, info)


def convert(
    file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    padding: str | None = None,
    dataset: str | None = None,
    source: str = "auto",
    path: str | None = None,
    limit: int | None = None,
    preset_network: Any = None,
) -> Converted:
    """Convert a released PyTorch network into an ellsjax run directory.

    ``out_dir`` gets ``config.json`` (network, the noise schedule as the training schedule, the
    dataset, and a ``converted_from`` record: file name, SHA-256, source class, time convention,
    where each setting came from) and checkpoint 0 with the weights, the layout of
    :func:`ellsjax.training.train`: :func:`ellsjax.models.load` and the CLI's ``--model`` take it.
    Options as in :func:`from_torch`; ``source``, ``path`` and ``limit`` say where the tools that
    need the network's training images (``calibrate``, ``evaluate``) load them from, as in
    :class:`ellsjax.training.TrainConfig` (default ``"auto"``: the whole split, from
    ``$ELLSJAX_DATA_DIR`` or tensorflow-datasets).

    Raises:
        ValueError: as :func:`from_torch`, or ``out_dir`` already holds a run.
    """
    from ellsjax import training as _training

    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    if (out / _training.CONFIG_FILE).exists() or (out / _training.CHECKPOINT_DIR).exists():
        raise ValueError(f"out_dir: {out} already holds a run; choose another directory")
    conv = from_torch(file, arch=arch, preset=preset, image_size=image_size, channels=channels, padding=padding,
                      dataset=dataset, preset_network=preset_network)
    cfg = _training.TrainConfig(steps=1, schedule=conv.schedule, dataset=conv.info["dataset"], source=source,
                                path=path, limit=limit, time_levels=conv.net.time_steps if conv.net.arch == "ddpm-unet"
                                else 1000)
    # a fresh optimizer state beside the weights, as a training run's step 0 has (`train --resume` fine-tunes)
    params = jax.device_put(conv.state, jax.devices()[0])
    opt_state, ema = _training._cached_opt_init(_training._step_key(cfg))(params)
    state = _training.TrainState(0, params, opt_state, ema, _training._run_key(cfg.seed))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _training._Checkpoints(out, create=True, keep=1)
    ckpt.save(state)
    with open(file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {"file": Path(file).name, "sha256": digest, **conv.info, "seconds": round(time.perf_counter() - t0, 2)}
    _training._write_json_atomic(out / _training.CONFIG_FILE, {
        "format": _training._FORMAT, "net": conv.net.to_dict(), "train": cfg.to_dict(), "data": None,
        "ellsjax_version": _training._version(), "converted_from": record,
    })
    return conv._replace(info=record)



def network_run(
    weights: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    net: _nets.NetConfig,
    train: Any,
    log: Any = None,
) -> _nets.NetConfig:
    """Convert ``weights`` into ``run_dir`` for an experiment whose network is ``net`` (trained on
    ``train``'s data) and return the converted network's config: the file must agree with ``net``'s
    architecture, channels and padding, and takes ``net``'s image size and ``train``'s dataset. A
    ``run_dir`` already converted from the same file (SHA-256) is reused; any other run there is an
    error. Used by :func:`ellsjax.reproduce.run` and :func:`ellsjax.locality.run` (``--weights``)."""
    import json

    from ellsjax import training as _training

    out = Path(run_dir)
    cfg_path = out / _training.CONFIG_FILE
    if cfg_path.exists() or (out / _training.CHECKPOINT_DIR).exists():
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            had = json.loads(cfg_path.read_text()).get("converted_from", {}).get("sha256")
        except (OSError, ValueError):
            had = None
        if had != digest:
            raise ValueError(f"weights: {out} already holds another network (trained here or converted from another "
                             "file); choose another output directory")
        if log is not None:
            log(f"using the network converted before from {Path(weights).name} in {out}")
        return _training.load_run_config(out)[0]
    conv = convert(weights, out, arch=net.arch, image_size=net.image_size, channels=net.channels,
                   padding=None if net.arch == "ddpm-unet" else net.padding, dataset=train.dataset,
                   source=train.source, path=train.path, limit=train.limit)
    if log is not None:
        log(f"converted {Path(weights).name} ({conv.info['source_class']}) -> {out} in {conv.info['seconds']:.1f} s; "
            f"{conv.info['time']}")
    return conv.net


def trained_or_converted(run_dir: str | os.PathLike, net: _nets.NetConfig, train: Any, data: Any, *,
                         weights: str | os.PathLike | None = None, log: Any = print, progress: Any = False,
                         what: str = "experiment") -> tuple[_nets.NetConfig, Any, str]:
    """An experiment's network in ``run_dir``: converted from the released ``weights`` (checked against
    ``net``, :func:`network_run`), or trained for ``train`` on ``data`` (resumed where ``run_dir``
    holds a run). Returns ``(net, train config, note)``: the note says where the network came from."""
    from ellsjax import training as _training

    if weights is not None:
        net = network_run(weights, run_dir, net=net, train=train, log=log)
        return net, _training.load_run_config(run_dir)[1], f"the network converted from {Path(weights).name}, " \
            "not trained here"
    log(f"training {net.arch} for {train.steps} steps on {len(data[0])} images -> {run_dir}")
    _training.train(run_dir, net, train, data=data, resume=Path(run_dir).exists(), progress=progress)
    return net, train, ""

