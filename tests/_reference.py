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


# --- the other analytic denoisers (PSPC, Wiener, PCA locality, σ-CFDM), from their definitions ---


def pspc(images, x, a, s, k):
    """PSPC-Square (Niedoba et al. 2025, eq. 11): every k×k window inside the image (top-left
    corners (r, c), no padding) gets the posterior mean of the training windows; pixels average
    the windows covering them."""
    n, h, w, ch = images.shape
    out = np.zeros(x.shape)
    count = np.zeros((h, w, 1))
    for r in range(h - k + 1):
        for c in range(w - k + 1):
            count[r : r + k, c : c + k] += 1
            keys = images[:, r : r + k, c : c + k]
            for b in range(len(x)):
                out[b, r : r + k, c : c + k] += posterior(x[b, r : r + k, c : c + k], keys, keys, a[b], s[b]).reshape(k, k, ch)
    return out / count[None]


def moments(images, ddof):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    mu = flat.mean(0)
    xc = flat - mu
    return mu, xc.T @ xc / (len(flat) - ddof)


def gaussian_posterior_mean(mu, cov, x, a, s):
    """E[x0 | x_t] for x0 ~ N(mu, cov), x_t = a x0 + s ε: mu + a cov (a² cov + s² I)⁻¹ (x_t − a mu)."""
    d = len(mu)
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    out = np.stack([mu + a[b] * cov @ np.linalg.solve(a[b] ** 2 * cov + s[b] ** 2 * np.eye(d), flat[b] - a[b] * mu)
                    for b in range(len(x))])
    return out.reshape(x.shape)


def wiener(images, x, a, s, ddof=0):
    mu, cov = moments(images, ddof)
    return gaussian_posterior_mean(mu, cov, x, a, s)


def wiener_matrix(cov, ab):
    """The Wiener filter W = ab·cov (ab·cov + (1 − ab) I)⁻¹ applied to x_t/a − mu."""
    d = len(cov)
    return ab * cov @ np.linalg.inv(ab * cov + (1 - ab) * np.eye(d))


def pca_mask(cov, ab, threshold, relative_to="row"):
    """N[m, n] = 1 if output m reads input n (Lukoianov et al. 2025): row rule |W_mn| ≥ θ·max_n'|W_mn'|;
    'global' transcribes the release (rows divided by their diagonal, global max, columns)."""
    wm = wiener_matrix(cov, ab)
    if relative_to == "row":
        mag = np.abs(wm)
        rowmax = mag.max(1, keepdims=True)
        return (mag >= threshold * rowmax) & (rowmax > 0)
    diag = np.diag(wm).copy()
    diag[np.abs(diag) < 1e-6] = 1.0
    norm = np.abs(wm / diag[:, None])
    return (norm >= threshold * norm.max()).T


def pca(images, x, a, s, threshold, relative_to="row", ddof=1, temperature=1.0, stats_images=None):
    """Per output entry m: softmax over whole training images of −Σ_{n∈N(m)} (x_n − aφ_n)²/(2 s² T)."""
    _, cov = moments(images if stats_images is None else stats_images, ddof)
    flat_i = np.asarray(images, np.float64).reshape(len(images), -1)
    flat_x = np.asarray(x, np.float64).reshape(len(x), -1)
    out = np.zeros(flat_x.shape)
    for b in range(len(x)):
        mask = pca_mask(cov, a[b] ** 2, threshold, relative_to)
        for m in range(flat_x.shape[1]):
            sel = mask[m]
            d2 = ((flat_x[b, sel][None] - a[b] * flat_i[:, sel]) ** 2).sum(1)
            logit = -d2 / (2 * s[b] ** 2 * temperature)
            wgt = np.exp(logit - logit.max())
            out[b, m] = wgt @ flat_i[:, m] / wgt.sum()
    return out.reshape(x.shape)


def cfdm(images, x, a, s, sigma, noise):
    """σ-CFDM (Scarvelis et al. 2025) mapped to VP time: mean over m of the ideal posterior at the
    perturbed query x_t + σ(a + s) ε_m."""
    out = np.zeros(x.shape)
    for b in range(len(x)):
        for eps in noise:
            q = x[b] + sigma * (a[b] + s[b]) * eps
            out[b] += posterior(q, images, images, a[b], s[b]).reshape(x.shape[1:])
    return out / len(noise)
