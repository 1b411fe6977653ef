"""Small, obviously-correct float64 numpy implementations of the machines, written from their
definitions (Kamb & Ganguli, arXiv 2412.20292) one pixel at a time. Slow; for tiny test inputs."""

from __future__ import annotations

import numpy as np


def posterior(q, keys, vals, a, s):
    """Σ_j softmax_j(−‖q − a k_j‖²/2s²) v_j; at s = 0 the average over the nearest keys."""
    q = np.asarray(q, np.float64).ravel()
    keys = np.asarray(keys, np.float64).reshape(len(keys), -1)
    vals = np.asarray(vals, np.float64).reshape(len(vals), -1)
    d2 = ((q[None, :] - a * keys) ** 2).sum(1)
    if s == 0:
        w = (d2 == d2.min()).astype(np.float64)
    else:
        logit = -d2 / (2 * s * s)
        w = np.exp(logit - logit.max())
    return (w @ vals) / w.sum()


def window(img, r, c, k, mode):
    """The k×k window of img [H, W, C] centered at (r, c): 'zeros' pads with 0, 'circular' wraps."""
    h, w, ch = img.shape
    out = np.zeros((k, k, ch))
    for i in range(k):
        for j in range(k):
            rr, cc = r + i - k // 2, c + j - k // 2
            if mode == "circular":
                out[i, j] = img[rr % h, cc % w]
            elif 0 <= rr < h and 0 <= cc < w:
                out[i, j] = img[rr, cc]
    return out


def windows(img, k, mode):
    """All windows of img: [H, W, k, k, C]."""
    h, w, _ = img.shape
    return np.array([[window(img, r, c, k, mode) for c in range(w)] for r in range(h)])


def ideal(images, x, a, s):
    return np.stack([posterior(x[b], images, images, a[b], s[b]).reshape(x.shape[1:]) for b in range(len(x))])


def local(images, x, a, s, k):
    n, h, w, ch = images.shape
    wins = [windows(im, k, "zeros") for im in images]
    out = np.zeros(x.shape)
    for b in range(len(x)):
        xw = windows(x[b], k, "zeros")
        for r in range(h):
            for c in range(w):
                keys = [wi[r, c] for wi in wins]
                out[b, r, c] = posterior(xw[r, c], keys, images[:, r, c], a[b], s[b])
    return out


def els(images, x, a, s, k):
    n, h, w, ch = images.shape
    hk = k // 2
    pos = [(r, c) for r in range(hk, h - hk) for c in range(hk, w - hk)]
    wins = [windows(im, k, "zeros") for im in images]
    keys = [wi[r, c] for wi in wins for (r, c) in pos]
    vals = [im[r, c] for im in images for (r, c) in pos]
    out = np.zeros(x.shape)
    for b in range(len(x)):
        xw = windows(x[b], k, "circular")
        for r in range(h):
            for c in range(w):
                out[b, r, c] = posterior(xw[r, c], keys, vals, a[b], s[b])
    return out


def bbels(images, x, a, s, k):
    n, h, w, ch = images.shape
    if k >= min(h, w):
        return local(images, x, a, s, k)
    hk = k // 2

    def cls(v, size):  # border offset, or 'in' for the interior
        return v if v < hk else (v - size if v >= size - hk else "in")

    wins = [windows(im, k, "zeros") for im in images]
    xws = [windows(xb, k, "zeros") for xb in x]
    out = np.zeros(x.shape)
    for r in range(h):
        for c in range(w):
            pos = [(rr, cc) for rr in range(h) for cc in range(w) if cls(rr, h) == cls(r, h) and cls(cc, w) == cls(c, w)]
            keys = [wi[rr, cc] for wi in wins for (rr, cc) in pos]
            vals = [im[rr, cc] for im in images for (rr, cc) in pos]
            for b in range(len(x)):
                out[b, r, c] = posterior(xws[b][r, c], keys, vals, a[b], s[b])
    return out


def conditional(fn, images, labels, x, label, *args):
    """Run a reference machine per batch element on the images of that element's class."""
    return np.concatenate(
        [fn(images[labels == label[b]], x[b : b + 1], *[np.asarray(v)[b : b + 1] for v in args[:2]], *args[2:]) for b in range(len(x))]
    )
