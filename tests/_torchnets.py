"""The released networks' PyTorch definitions, re-done in float64 numpy on torch's layouts (NCHW,
torch weight shapes, torch state-dict names), for the conversion tests.

Written from the reference sources, independently of ellsjax's Flax networks and of the
converter's key mapping: Kamb & Ganguli's ``models.py`` (``MinimalResNet``, ``MinimalUNet``,
``UBlock``, ``EmbeddingModule``; github.com/Kambm/convolutional_diffusion) and the locality repo's
DDPM UNet (``src/local_diffusion/utils/neural_networks.py``; github.com/ottogin/locality-in-diffusion-models).
The ``*_sd`` builders draw random weights under the reference's state-dict names and shapes.
"""

from __future__ import annotations

import math

import numpy as np

from tests import _torchwriter as tw

# --------------------------------------------------------------------------- layers (NCHW, float64)


def conv2d(x, w, b, *, mode="zeros", stride=1, pad=None):
    """``nn.Conv2d`` (cross-correlation) with ``padding=k//2`` (torch's 'same' for odd k)."""
    k = w.shape[2]
    p = k // 2 if pad is None else pad
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="wrap" if mode == "circular" else "constant")
    ho = (xp.shape[2] - k) // stride + 1
    wo = (xp.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def conv_transpose2(x, w, b):
    """``nn.ConvTranspose2d(kernel_size=2, stride=2)``: out[2i+a, 2j+c] = Σ x[i, j]·w[:, :, a, c]."""
    bsz, _, h, wd = x.shape
    out = np.zeros((bsz, w.shape[1], 2 * h, 2 * wd))
    for a in range(2):
        for c in range(2):
            out[:, :, a::2, c::2] = np.einsum("bihw,io->bohw", x, w[:, :, a, c])
    return out + b[None, :, None, None]


def group_norm(x, groups, gamma, beta, eps=1e-5):
    shape = x.shape
    g = x.reshape(shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    g = g.reshape(shape)
    extra = (None,) * (len(shape) - 2)
    return g * gamma[(slice(None), *extra)] + beta[(slice(None), *extra)]


def linear(x, w, b):
    return x @ w.T + b


def relu(x):
    return np.maximum(x, 0.0)


def swish(x):
    return x / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- Kamb & Ganguli


def kg_embedding(sd, t, dim, label):
    """``EmbeddingModule``: t / 10000^(i/(d-1)), sin then cos, plus the class embedding."""
    d = dim // 2
    targ = t[:, None] / (10000 ** (np.arange(d) / (d - 1)))[None, :]
    emb = np.concatenate([np.sin(targ), np.cos(targ)], axis=1)
    if "embedding.class_embeddings.weight" in sd:
        emb = emb + sd["embedding.class_embeddings.weight"][label]
    return emb


def kg_resnet(sd, t, x, label, *, mode, num_layers, norm=False):
    """``MinimalResNet.forward(t, x, label)``."""
    g = lambda k: sd[k]  # noqa: E731
    dim = g("up_projection.weight").shape[0]
    emb = kg_embedding(sd, t, dim, label)

    def mlp(i):
        return relu(group_norm(linear(emb, g(f"embs.{i}.0.weight"), g(f"embs.{i}.0.bias")), 8,
                               g(f"embs.{i}.1.weight"), g(f"embs.{i}.1.bias")))

    state = conv2d(x, g("up_projection.weight"), g("up_projection.bias"), mode=mode)
    for i in range(num_layers):
        z = conv2d(state + mlp(i)[:, :, None, None], g(f"convs.{i}.0.weight"), g(f"convs.{i}.0.bias"), mode=mode)
        if norm:
            z = group_norm(z, 8, g(f"convs.{i}.1.weight"), g(f"convs.{i}.1.bias"))
        state = state + relu(z)
    add_one = f"embs.{num_layers}.0.weight" in sd
    nxt = state + (mlp(num_layers)[:, :, None, None] if add_one else state)
    if norm:
        nxt = group_norm(nxt, 8, g("down_projection.0.weight"), g("down_projection.0.bias"))
        return conv2d(nxt, g("down_projection.1.weight"), g("down_projection.1.bias"), mode=mode)
    return conv2d(nxt, g("down_projection.weight"), g("down_projection.bias"), mode=mode)


def _ublock(sd, prefix, x, emb, mode, norm):
    x = x + linear(relu(emb), sd[f"{prefix}emb.1.weight"], sd[f"{prefix}emb.1.bias"])[:, :, None, None]
    layers = (["conv", "norm", "relu"] if norm else ["conv", "relu"]) * 2
    for j, kind in enumerate(layers):
        if kind == "conv":
            x = conv2d(x, sd[f"{prefix}model.{j}.weight"], sd[f"{prefix}model.{j}.bias"], mode=mode)
        elif kind == "norm":
            c = x.shape[1]
            x = group_norm(x, min(32, c), sd[f"{prefix}model.{j}.weight"], sd[f"{prefix}model.{j}.bias"])
        else:
            x = relu(x)
    return x


def kg_unet(sd, t, x, label, *, mode, levels, norm=False):
    """``MinimalUNet.forward(t, x, label)`` (no last_norm)."""
    emb_dim = sd["feature_blocks.0.emb.1.weight"].shape[1]
    emb = kg_embedding(sd, t, emb_dim, label)
    skips = []
    for i in range(levels - 1):
        x = _ublock(sd, f"feature_blocks.{i}.", x, emb, mode, norm)
        skips.append(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    x = _ublock(sd, "bottleneck.", x, emb, mode, norm)
    for i, skip in enumerate(skips[::-1]):
        up = conv_transpose2(x, sd[f"upsamples.{i}.weight"], sd[f"upsamples.{i}.bias"])
        x = _ublock(sd, f"output_blocks.{i}.", np.concatenate([skip, up], axis=1), emb, mode, norm)
    x = x + linear(relu(emb), sd["last_emb.1.weight"], sd["last_emb.1.bias"])[:, :, None, None]
    return conv2d(x, sd["output_conv.weight"], sd["output_conv.bias"], mode=mode)


# --------------------------------------------------------------------------- DDPM UNet


def ddpm_table(steps, d):
    """``TimeEmbedding``'s table, in float32 as torch computes it."""
    emb = np.exp(-(np.arange(0, d, 2, dtype=np.float32) / np.float32(d) * np.float32(math.log(10000))))
    arg = np.arange(steps, dtype=np.float32)[:, None] * emb[None, :]
    return np.stack([np.sin(arg), np.cos(arg)], axis=-1).reshape(steps, d)


def _attn(sd, p, x):
    b, c, h, w = x.shape
    hh = group_norm(x, 32, sd[f"{p}group_norm.weight"], sd[f"{p}group_norm.bias"])
    q, k, v = (conv2d(hh, sd[f"{p}proj_{n}.weight"], sd[f"{p}proj_{n}.bias"]) for n in "qkv")
    q = q.transpose(0, 2, 3, 1).reshape(b, h * w, c)
    k = k.reshape(b, c, h * w)
    wgt = np.einsum("bic,bcj->bij", q, k) * (int(c) ** (-0.5))
    wgt = np.exp(wgt - wgt.max(-1, keepdims=True))
    wgt /= wgt.sum(-1, keepdims=True)
    v = v.transpose(0, 2, 3, 1).reshape(b, h * w, c)
    out = np.einsum("bij,bjc->bic", wgt, v).reshape(b, h, w, c).transpose(0, 3, 1, 2)
    return x + conv2d(out, sd[f"{p}proj.weight"], sd[f"{p}proj.bias"])


def _resblock(sd, p, x, temb):
    h = conv2d(swish(group_norm(x, 32, sd[f"{p}block1.0.weight"], sd[f"{p}block1.0.bias"])),
               sd[f"{p}block1.2.weight"], sd[f"{p}block1.2.bias"])
    h = h + linear(swish(temb), sd[f"{p}temb_proj.1.weight"], sd[f"{p}temb_proj.1.bias"])[:, :, None, None]
    h = conv2d(swish(group_norm(h, 32, sd[f"{p}block2.0.weight"], sd[f"{p}block2.0.bias"])),
               sd[f"{p}block2.3.weight"], sd[f"{p}block2.3.bias"])
    h = h + (conv2d(x, sd[f"{p}shortcut.weight"], sd[f"{p}shortcut.bias"]) if f"{p}shortcut.weight" in sd else x)
    return _attn(sd, f"{p}attn.", h) if f"{p}attn.proj.weight" in sd else h


def ddpm_unet(sd, x, step):
    """``UNet.forward(x, t)`` of the locality repo, ``t`` the integer step (eval mode: no dropout)."""
    temb = sd["time_embedding.timembedding.0.weight"][step]
    temb = linear(swish(linear(temb, sd["time_embedding.timembedding.1.weight"],
                               sd["time_embedding.timembedding.1.bias"])),
                  sd["time_embedding.timembedding.3.weight"], sd["time_embedding.timembedding.3.bias"])
    h = conv2d(x, sd["head.weight"], sd["head.bias"])
    hs = [h]
    i = 0
    while f"downblocks.{i}.main.weight" in sd or f"downblocks.{i}.block1.0.weight" in sd:
        p = f"downblocks.{i}."
        h = conv2d(h, sd[p + "main.weight"], sd[p + "main.bias"], stride=2, pad=1) if p + "main.weight" in sd \
            else _resblock(sd, p, h, temb)
        hs.append(h)
        i += 1
    for i in range(2):
        h = _resblock(sd, f"middleblocks.{i}.", h, temb)
    i = 0
    while f"upblocks.{i}.main.weight" in sd or f"upblocks.{i}.block1.0.weight" in sd:
        p = f"upblocks.{i}."
        if p + "main.weight" in sd:
            h = conv2d(h.repeat(2, axis=2).repeat(2, axis=3), sd[p + "main.weight"], sd[p + "main.bias"])
        else:
            h = _resblock(sd, p, np.concatenate([h, hs.pop()], axis=1), temb)
        i += 1
    assert not hs
    h = swish(group_norm(h, 32, sd["tail.0.weight"], sd["tail.0.bias"]))
    return conv2d(h, sd["tail.2.weight"], sd["tail.2.bias"])


# --------------------------------------------------------------------------- random state dicts


class _SD(dict):
    def __init__(self, seed):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def _w(self, shape, fan_in):
        return (self.rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

    def conv(self, key, cin, cout, k):
        self[f"{key}.weight"] = self._w((cout, cin, k, k), cin * k * k)
        self[f"{key}.bias"] = self._w((cout,), 4.0)

    def linear(self, key, cin, cout):
        self[f"{key}.weight"] = self._w((cout, cin), cin)
        self[f"{key}.bias"] = self._w((cout,), 4.0)

    def norm(self, key, c):
        self[f"{key}.weight"] = (1.0 + 0.2 * self.rng.standard_normal(c)).astype(np.float32)
        self[f"{key}.bias"] = (0.2 * self.rng.standard_normal(c)).astype(np.float32)


def kg_resnet_sd(seed, *, channels, dim, layers, k=3, lastk=3, num_classes=None, add_one=True, norm=False):
    sd = _SD(seed)
    if num_classes:
        sd["embedding.class_embeddings.weight"] = sd.rng.standard_normal((num_classes, dim)).astype(np.float32)
    sd.conv("up_projection", channels, dim, k)
    for i in range(layers + int(add_one)):
        sd.linear(f"embs.{i}.0", dim, dim)
        sd.norm(f"embs.{i}.1", dim)
    for i in range(layers):
        sd.conv(f"convs.{i}.0", dim, dim, k)
        if norm:
            sd.norm(f"convs.{i}.1", dim)
    if norm:
        sd.norm("down_projection.0", dim)
        sd.conv("down_projection.1", dim, channels, lastk)
    else:
        sd.conv("down_projection", dim, channels, lastk)
    return dict(sd)


def _ublock_sd(sd, prefix, cin, cout, k, emb, norm):
    sd.linear(f"{prefix}emb.1", emb, cin)
    step = 3 if norm else 2
    for n in range(2):
        sd.conv(f"{prefix}model.{step * n}", cin if n == 0 else cout, cout, k)
        if norm:
            sd.norm(f"{prefix}model.{step * n + 1}", cout)


def kg_unet_sd(seed, *, channels, fsizes, emb, k=3, lastk=3, num_classes=None, norm=False):
    sd = _SD(seed)
    if num_classes:
        sd["embedding.class_embeddings.weight"] = sd.rng.standard_normal((num_classes, emb)).astype(np.float32)
    cin = channels
    for i, f in enumerate(fsizes[:-1]):
        _ublock_sd(sd, f"feature_blocks.{i}.", cin, f, k, emb, norm)
        cin = f
    _ublock_sd(sd, "bottleneck.", fsizes[-2], fsizes[-1], k, emb, norm)
    for n, i in enumerate(range(len(fsizes) - 1, 0, -1)):
        sd[f"upsamples.{n}.weight"] = sd._w((fsizes[i], fsizes[i - 1], 2, 2), fsizes[i])
        sd[f"upsamples.{n}.bias"] = sd._w((fsizes[i - 1],), 4.0)
        _ublock_sd(sd, f"output_blocks.{n}.", 2 * fsizes[i - 1], fsizes[i - 1], 3, emb, norm)
    sd.linear("last_emb.1", emb, fsizes[0])
    sd.conv("output_conv", fsizes[0], channels, lastk)
    return dict(sd)


def _resblock_sd(sd, p, cin, cout, tdim, attn):
    sd.norm(f"{p}block1.0", cin)
    sd.conv(f"{p}block1.2", cin, cout, 3)
    sd.linear(f"{p}temb_proj.1", tdim, cout)
    sd.norm(f"{p}block2.0", cout)
    sd.conv(f"{p}block2.3", cout, cout, 3)
    if cin != cout:
        sd.conv(f"{p}shortcut", cin, cout, 1)
    if attn:
        sd.norm(f"{p}attn.group_norm", cout)
        for n in ("proj_q", "proj_k", "proj_v", "proj"):
            sd.conv(f"{p}attn.{n}", cout, cout, 1)


def ddpm_unet_sd(seed, *, channels, ch, ch_mult, attn, num_res_blocks, steps=1000):
    """The locality repo's ``UNet(T, ch, ch_mult, attn, num_res_blocks, dropout, in/out_channels)``."""
    sd = _SD(seed)
    tdim = 4 * ch
    sd["time_embedding.timembedding.0.weight"] = ddpm_table(steps, ch)
    sd.linear("time_embedding.timembedding.1", ch, tdim)
    sd.linear("time_embedding.timembedding.3", tdim, tdim)
    sd.conv("head", channels, ch, 3)
    chs, now, n = [ch], ch, 0
    for i, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            _resblock_sd(sd, f"downblocks.{n}.", now, ch * mult, tdim, i in attn)
            now = ch * mult
            chs.append(now)
            n += 1
        if i != len(ch_mult) - 1:
            sd.conv(f"downblocks.{n}.main", now, now, 3)
            chs.append(now)
            n += 1
    _resblock_sd(sd, "middleblocks.0.", now, now, tdim, True)
    _resblock_sd(sd, "middleblocks.1.", now, now, tdim, False)
    n = 0
    for i, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            _resblock_sd(sd, f"upblocks.{n}.", chs.pop() + now, ch * mult, tdim, i in attn)
            now = ch * mult
            n += 1
        if i != 0:
            sd.conv(f"upblocks.{n}.main", now, now, 3)
            n += 1
    sd.norm("tail.0", now)
    sd.conv("tail.2", now, channels, 3)
    return dict(sd)


# --------------------------------------------------------------------------- pickled modules


def _leaf_class(path: str, params: dict) -> str:
    w = params.get("weight")
    if w is None:
        return "torch.nn.modules.container.Sequential"
    if path.startswith("upsamples."):
        return "torch.nn.modules.conv.ConvTranspose2d"
    if w.ndim == 4:
        return "torch.nn.modules.conv.Conv2d"
    if path.endswith("class_embeddings"):
        return "torch.nn.modules.sparse.Embedding"
    if w.ndim == 2:
        return "torch.nn.modules.linear.Linear"
    return "torch.nn.modules.normalization.GroupNorm"


_KG_CLASSES = {"embedding": "models.EmbeddingModule", "bottleneck": "models.UBlock"}


def module_tree(sd: dict, root: str, *, padding_mode: str, **root_attrs):
    """A whole pickled module (``torch.save(model)``) holding ``sd``: ``root`` is the class of the
    network (``models.MinimalResNet``), submodules get torch's classes, convs ``padding_mode``."""
    tree: dict = {}
    for key, v in sd.items():
        *path, name = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node.setdefault("__params__", {})[name] = v

    def build(node, path):
        params = node.get("__params__", {})
        children = {k: build(v, f"{path}.{k}".lstrip(".")) for k, v in node.items() if k != "__params__"}
        head = path.split(".")[0]
        if not path:
            return tw.module(root, params=params, children=children, **root_attrs)
        if re_ublock(path):
            qual = "models.UBlock"
        elif path in _KG_CLASSES:
            qual = _KG_CLASSES[path]
        elif children and all(k.isdigit() for k in children) and head in ("embs", "convs", "feature_blocks",
                                                                         "output_blocks", "upsamples"):
            qual = "torch.nn.modules.container.ModuleList" if "." not in path else \
                "torch.nn.modules.container.Sequential"
        else:
            qual = _leaf_class(path, params)
        attrs = {}
        if qual.endswith("Conv2d"):
            w = params["weight"]
            attrs = {"padding_mode": padding_mode if qual.endswith(".Conv2d") else "zeros", "padding": "same",
                     "kernel_size": tuple(w.shape[2:]), "stride": (1, 1)}
        return tw.module(qual, params=params, children=children, **attrs)

    def re_ublock(path):
        parts = path.split(".")
        return len(parts) == 2 and parts[0] in ("feature_blocks", "output_blocks") and parts[1].isdigit()

    return build(tree, "")
