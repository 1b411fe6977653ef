"""Implementation of :func:`ellsjax.data.load` and friends (see the package docstring)."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ellsjax import _checks
from ellsjax.data._idx import read_idx_split

#: The dataset names :func:`load` knows.
DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "celeb_a")
SOURCES: tuple[str, ...] = ("bundled", "npz", "idx", "tfds", "auto")
ENV_DATA_DIR = "ELLSJAX_DATA_DIR"

_SPLITS = {
    "mnist": ("train", "test"),
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "celeb_a": ("train", "validation", "test"),
}
# File names tried, in order, when ``path`` is a directory (source="npz").
_NPZ_FILENAMES = {
    "mnist": ("mnist.npz",),
    "fashion_mnist": ("fashion_mnist.npz",),
    "cifar10": ("cifar10.npz", "cifar10_subset.npz"),
    "celeb_a": ("celeb_a.npz",),
}
_IDX_DATASETS = ("mnist", "fashion_mnist")
_TFDS_PREPARABLE = ("mnist", "fashion_mnist")
_BUNDLED_FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz"}
_FULL_SIZES = {"train": 60000, "test": 10000}  # MNIST and Fashion-MNIST
# What each dataset's images are (H, W, C): a file read under a name must hold these, so that
# e.g. CIFAR-10 read as "mnist" is an error, not 32x32x3 "MNIST" (celeb_a: any size, 3 channels;
# aligned CelebA is 218x178).
_SHAPES: dict[str, tuple[int | None, int | None, int]] = {
    "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3), "celeb_a": (None, None, 3),
}
_RESIZE_CHUNK = 4096

# One batch of uint8 images [B,H,W,C], integer labels [B], and whether the batch
# reaches the end of the split (so that absent classes can be reported).
_Batch = tuple[np.ndarray, np.ndarray, bool]


class Dataset(NamedTuple):
    """Images and labels of one dataset split.

    Attributes:
        images: float32 ``[N, H, W, C]`` in ``[-1, 1]`` (uint8 ``p`` maps to
            ``p / 127.5 - 1``); grayscale images have ``C = 1``.
        labels: int32 ``[N]`` class ids (all zeros for celeb_a).
    """

    images: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------- public


def load(
    name: str,
    *,
    split: str = "train",
    source: str = "bundled",
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    classes: Iterable[int] | None = None,
) -> Dataset:
    """Loads a dataset split as float32 NHWC images in ``[-1, 1]`` and int32 labels.

    Sources:
        * ``"bundled"`` (default): the subsets shipped in the package (MNIST and
          Fashion-MNIST, train and test: the first images of each split in the
          original order; see :func:`bundled_info`). Asking for more images
          (``limit``) than are bundled, or for another dataset, is an error.
        * ``"npz"``: ``path`` is an ``.npz`` with uint8 ``x_{split}``
          ``[N,H,W(,C)]`` and ``y_{split}`` ``[N]`` arrays, or a directory with
          ``{name}.npz`` (``cifar10.npz`` or ``cifar10_subset.npz`` for cifar10).
          The images must be the named dataset's: 28x28x1 (mnist,
          fashion_mnist), 32x32x3 (cifar10), 3 channels (celeb_a), and a
          file whose first image is the other 28x28 dataset's is refused; a
          file with a scalar string entry ``name`` is checked against that
          instead (for resized copies). The ``"idx"`` source is checked alike.
        * ``"idx"``: ``path`` is a directory with the four standard MNIST-format
          IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
          ``t10k-...``); mnist and fashion_mnist only.
        * ``"tfds"``: ``tfds.data_source(..., data_dir=data_dir, download=False)``
          (needs ``pip install 'ellsjax[tfds]'``, no TensorFlow, never downloads).
          Data prepared by :func:`prepare_tfds` (``ellsjax_{name}``) in
          ``data_dir`` is preferred over the official tfds dataset. celeb_a has
          no class labels: its labels are returned as zeros.
        * ``"auto"``: ``"bundled"`` if the split is bundled and a ``limit`` is
          given that the bundled subset can satisfy (after ``classes``); else
          ``"npz"`` from the directory in ``$ELLSJAX_DATA_DIR`` if set and it
          holds the file; else ``"tfds"``. A request without ``limit`` means the
          whole split, so it never silently gets the bundled prefix.

    Selection happens in original dataset order (deterministic): first keep the
    labels in ``classes``, then the first ``limit`` of those.

    Resizing (``image_size=S``): non-square images (celeb_a, 218x178) are first
    center-cropped to a square of their shorter side; then pixels scaled to
    ``[0, 1]`` are resized to ``S x S`` with bilinear interpolation with
    antialiasing, exactly the separable weights of
    ``jax.image.resize(..., method="bilinear", antialias=True)`` (applied with
    numpy, in chunks), and mapped to ``[-1, 1]``. The bilinear (triangle) kernel
    has non-negative weights summing to one, so results stay in ``[-1, 1]``; a
    final clip only removes float rounding. MNIST-like data is resized 28 -> 32
    in the paper. ``image_size`` equal to a square native size is a no-op.

    Args:
        name: One of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (celeb_a also ``"validation"``).
        source: One of ``"bundled"``, ``"npz"``, ``"idx"``, ``"tfds"``, ``"auto"``.
        path: File or directory for the ``"npz"`` and ``"idx"`` sources.
        data_dir: tfds data directory (``"tfds"``; None means tfds' default).
        image_size: Output side length; None keeps the native size.
        limit: Keep at most the first ``limit`` images (after ``classes``).
        classes: Keep only these labels; each must occur in the split.

    Returns:
        ``Dataset(images, labels)``: float32 ``[N,H,W,C]`` in ``[-1,1]``, int32 ``[N]``.

    Raises:
        ValueError: Unknown ``name``/``split``/``source``, bad ``limit``,
            ``image_size`` or ``classes``, corrupt files, or an empty result.
        FileNotFoundError: A missing ``path`` or unprepared tfds data.
        ImportError: ``source="tfds"`` without tensorflow-datasets installed.

    Example:
        >>> import ellsjax.data
        >>> images, labels = ellsjax.data.load("mnist", limit=8, image_size=32)
        >>> images.shape, images.dtype, labels[:4].tolist()
        ((8, 32, 32, 1), dtype('float32'), [5, 0, 4, 1])
    """
    _check_name(name)
    _check_split(name, split)
    if source not in SOURCES:
        raise ValueError(f"unknown source={source!r}; choose one of {', '.join(SOURCES)}")
    limit = _checks.check_positive_int(limit, "limit", allow_none=True)
    image_size = _checks.check_positive_int(image_size, "image_size", allow_none=True)
    classes = _check_classes(classes)

    if source == "auto":
        source, path = _resolve_auto(name, split, limit, classes)

    if source == "bundled":
        _check_bundled_limit(name, split, limit, classes)
        x, y = _bundled_split(name, split)
        batches: Iterable[_Batch] = [(x, y, True)]
        where = f"the bundled {name} split={split!r}"
    elif source == "npz":
        npz = _npz_path(name, path)
        x, y = _read_npz_split(npz, name, split, where=f"path={str(npz)!r}")
        batches = [(x, y, True)]
        where = f"path={str(npz)!r} split={split!r}"
    elif source == "idx":
        if name not in _IDX_DATASETS:
            raise ValueError(
                f"source='idx' supports name in {_IDX_DATASETS}, not name={name!r}; "
                "use source='npz' or 'tfds'"
            )
        if path is None:
            raise ValueError("source='idx' needs path= (a directory holding the IDX files)")
        if split not in ("train", "test"):
            raise ValueError(f"source='idx' has splits 'train' and 'test', not split={split!r}")
        x, y = read_idx_split(path, split)
        _check_content(x[..., None], name, split, f"the IDX files in path={os.fspath(path)!r}")
        batches = [(x[..., None], y, True)]
        where = f"the IDX files in path={os.fspath(path)!r}"
    else:  # tfds
        count = limit if classes is None else None
        batches = _tfds_backend().iter_batches(name, split, data_dir, count)
        where = f"tfds {name} split={split!r} (data_dir={data_dir!r})"

    images, labels = _select(batches, classes, limit, where)
    return Dataset(_to_float(images, image_size), labels.astype(np.int32))


def bundled_info() -> dict[str, dict[str, dict[str, Any]]]:
    """Describes the bundled subsets, per dataset and split.

    Returns:
        ``{name: {split: info}}`` for the bundled datasets, where ``info`` has
        ``num_images`` (the first ``num_images`` of the split, original order),
        ``total_images`` (size of the full split), ``file`` (file name in
        ``ellsjax/data/_bundled/``), ``path``, ``sha256`` (of that file) and
        ``license`` (the dataset's section of ``_bundled/LICENSES.md``).

    Example:
        >>> import ellsjax.data
        >>> ellsjax.data.bundled_info()["mnist"]["train"]["num_images"]
        4000
    """
    info: dict[str, dict[str, dict[str, Any]]] = {}
    for name, filename in _BUNDLED_FILES.items():
        resource = _bundled_resource(filename)
        sha256 = hashlib.sha256(resource.read_bytes()).hexdigest()
        license_text = _license_section(name)
        info[name] = {
            split: {
                "num_images": len(_bundled_split(name, split)[1]),
                "total_images": _FULL_SIZES[split],
                "file": filename,
                "path": str(resource),
                "sha256": sha256,
                "license": license_text,
            }
            for split in _bundled_arrays(name)
        }
    return info


def prepare_tfds(
    name: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
) -> str:
    """Prepares an offline tfds copy of MNIST or Fashion-MNIST from IDX files.

    Runs the ``ellsjax_mnist`` / ``ellsjax_fashion_mnist`` builder (a
    ``tfds.core.GeneratorBasedBuilder`` that reads the IDX files with gzip and
    numpy, stores uint8 ``Tensor`` images and ``ClassLabel`` labels as
    ``array_record`` in the original order) through
    ``download_and_prepare(download_config=DownloadConfig(manual_dir=...))``.
    Needs no TensorFlow and no network; re-running on prepared data is a no-op.
    Afterwards ``load(name, source="tfds", data_dir=data_dir)`` reads it.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        manual_dir: Directory with the four IDX files (``.gz`` or plain).
        data_dir: tfds data directory to write to (None: tfds' default).

    Returns:
        The prepared dataset directory (``{data_dir}/ellsjax_{name}/1.0.0``).

    Example:
        >>> import ellsjax.data
        >>> ellsjax.data.prepare_tfds("mnist", "/data/mnist_idx", "/data/tfds")  # doctest: +SKIP
        >>> ds = ellsjax.data.load("mnist", source="tfds", data_dir="/data/tfds")  # doctest: +SKIP
    """
    _check_name(name)
    if name not in _TFDS_PREPARABLE:
        raise ValueError(
            f"prepare_tfds supports name in {_TFDS_PREPARABLE}, not name={name!r}"
        )
    if not Path(manual_dir).is_dir():
        raise FileNotFoundError(f"manual_dir={os.fspath(manual_dir)!r} is not a directory")
    return _tfds_backend().prepare(name, manual_dir, data_dir)


# ----------------------------------------------------------------- argument checks


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; known: {', '.join(DATASETS)}")


def _check_split(name: str, split: str) -> None:
    if split not in _SPLITS[name]:
        raise ValueError(
            f"unknown split={split!r} for {name}; choose one of {', '.join(_SPLITS[name])}"
        )


def _check_classes(classes: Iterable[int] | None) -> tuple[int, ...] | None:
    if classes is None:
        return None
    try:
        values = tuple(classes)
    except TypeError:
        raise ValueError(f"classes must be an iterable of ints, got classes={classes!r}") from None
    if not values or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in values
    ):
        raise ValueError(f"classes must be a non-empty iterable of ints, got classes={classes!r}")
    return tuple(sorted({int(c) for c in values}))


# ------------------------------------------------------------------------ sources


def _bundled_resource(filename: str):
    return importlib.resources.files("ellsjax.data") / "_bundled" / filename


@functools.cache
def _bundled_arrays(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 NHWC, labels)}`` of a bundled file, read-only, cached."""
    resource = _bundled_resource(_BUNDLED_FILES[name])
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
        splits = [key[2:] for key in z.files if key.startswith("x_")]
        out = {}
        for split in splits:
            x, y = _check_arrays(z[f"x_{split}"], z[f"y_{split}"], name, str(resource))
            x.setflags(write=False)
            y.setflags(write=False)
            out[split] = (x, y)
    return out


def _bundled_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    bundled = _bundled_arrays(name) if name in _BUNDLED_FILES else {}
    if split not in bundled:
        what = ", ".join(f"{n} ({'/'.join(_bundled_arrays(n))})" for n in _BUNDLED_FILES)
        raise ValueError(
            f"name={name!r} split={split!r} is not bundled; bundled: {what}. "
            "Use source='npz' (path=...), 'idx', 'tfds' or 'auto' for other data."
        )
    return bundled[split]


def _bundled_count(name: str, split: str, classes: tuple[int, ...] | None) -> int:
    labels = _bundled_split(name, split)[1]
    return len(labels) if classes is None else int(np.isin(labels, classes).sum())


def _check_bundled_limit(
    name: str, split: str, limit: int | None, classes: tuple[int, ...] | None
) -> None:
    available = _bundled_count(name, split, classes)
    if classes is not None:
        present = set(np.unique(_bundled_split(name, split)[1]).tolist())
        missing = sorted(set(classes) - present)
        if missing:
            raise ValueError(f"classes={list(classes)}: class {', '.join(map(str, missing))} absent: labels "
                             f"{missing} do not occur in the bundled {name} split={split!r} (labels present: "
                             f"{sorted(present)})")
    if limit is not None and limit > available:
        with_classes = "" if classes is None else f" with classes={classes}"
        raise ValueError(
            f"limit={limit} exceeds the {available} images{with_classes} bundled for {name} "
            f"split={split!r} (the first {len(_bundled_split(name, split)[1])} of the split); "
            "use source='npz', 'idx', 'tfds' or 'auto' for more"
        )


def _resolve_auto(
    name: str, split: str, limit: int | None, classes: tuple[int, ...] | None
) -> tuple[str, Path | None]:
    bundled = name in _BUNDLED_FILES and split in _bundled_arrays(name)
    if bundled and limit is not None and limit <= _bundled_count(name, split, classes):
        return "bundled", None
    env_dir = os.environ.get(ENV_DATA_DIR)
    if env_dir:
        for filename in _NPZ_FILENAMES[name]:
            if (Path(env_dir) / filename).is_file():
                return "npz", Path(env_dir) / filename
    return "tfds", None


def _npz_path(name: str, path: str | os.PathLike | None) -> Path:
    if path is None:
        raise ValueError("source='npz' needs path= (an .npz file or a directory holding one)")
    path = Path(path)
    if path.is_dir():
        for filename in _NPZ_FILENAMES[name]:
            if (path / filename).is_file():
                return path / filename
        raise FileNotFoundError(
            f"path={str(path)!r} is a directory without {' or '.join(_NPZ_FILENAMES[name])}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: path={str(path)!r}")
    return path


def _read_npz_split(path: Path, name: str, split: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read npz file {where}: {e.strerror or e}") from None
    if head != b"PK\x03\x04":  # an .npz is a zip archive of .npy arrays
        kind = "an .npy array" if head[:1] == b"\x93" else "empty" if not head else f"a file starting with {head!r}"
        raise ValueError(f"{where} is not an .npz archive (a zip of .npy arrays x_{split}, y_{split}); it is {kind}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            x = z[f"x_{split}"] if f"x_{split}" in keys else None
            y = z[f"y_{split}"] if f"y_{split}" in keys else None
            declared = str(z["name"]) if "name" in keys and z["name"].ndim == 0 else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"cannot read npz file {where}: {type(e).__name__}: {e}") from e
    if x is None:
        raise ValueError(f"split={split!r}: {where} has no array 'x_{split}' (arrays: {keys})")
    if y is None and name == "celeb_a":
        y = np.zeros(len(x), np.int64)
    elif y is None:
        raise ValueError(f"split={split!r}: {where} has no array 'y_{split}' (arrays: {keys})")
    x, y = _check_arrays(x, y, name, where)
    _check_content(x, name, split, where, declared=declared)
    return x, y


def _check_content(x: np.ndarray, name: str, split: str, where: str, *, declared: str | None = None) -> None:
    """The images of a file read as dataset ``name`` must be that dataset's: its own ``name`` entry if
    it has one; else the dataset's image shape and channels, and for the two 28x28 grey datasets a
    first image that is not the other dataset's (the bundled prefixes hold both first images)."""
    if declared is not None:
        if declared != name:
            raise ValueError(f"name={name!r}: {where} says it holds {declared!r} (its 'name' entry), not {name!r}")
        return  # the file names itself: a resized or re-cut copy is the user's choice
    h, w, c = x.shape[1:]
    eh, ew, ec = _SHAPES[name]
    if c != ec or (eh is not None and (h, w) != (eh, ew)):
        like = [n for n, (a, b, ch) in _SHAPES.items() if n != name and ch == c and (a, b) == (h, w)] or [
            n for n, (a, _, ch) in _SHAPES.items() if n != name and ch == c and a is None]
        looks = f"; it looks like {' or '.join(like)}" if like else ""
        want = f"{eh}x{ew}x{ec}" if eh is not None else f"{ec}-channel"
        raise ValueError(
            f"name={name!r}: {where} holds {h}x{w}x{c} images, not {name}'s {want} images{looks}. Pass the dataset "
            "the file holds (--dataset), or add a 'name' entry to the file for a resized copy"
        )
    for other in _BUNDLED_FILES:
        if other == name or _SHAPES[other] != _SHAPES[name] or len(x) == 0:
            continue
        prefix = _bundled_arrays(other).get(split, (None,))[0]
        if prefix is not None and prefix.shape[1:] == x.shape[1:] and np.array_equal(x[0], prefix[0]):
            raise ValueError(
                f"name={name!r}: {where} holds {other}, not {name}: its first {split} image is {other}'s. Pass "
                f"--dataset {other} (name={other!r}), or the {name} file"
            )


def _check_arrays(
    x: np.ndarray, y: np.ndarray, name: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(
            f"{where}: images must be uint8 [N,H,W] or [N,H,W,C], got {x.dtype} {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be integers [N] with N={len(x)}, got {y.dtype} {y.shape}"
        )
    return x, y


def _tfds_backend():
    """Imports the tfds integration lazily, with an actionable error."""
    try:
        import importlib_resources  # noqa: F401  (tfds 4.9.10 needs it to prepare)
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "source='tfds' and prepare_tfds need tensorflow-datasets (TensorFlow itself is "
            f"not needed): pip install 'ellsjax[tfds]' ({e})"
        ) from e
    from ellsjax.data import _tfds

    return _tfds


def _license_section(name: str) -> str:
    """The ``## {name}`` section of ``_bundled/LICENSES.md``."""
    text = _bundled_resource("LICENSES.md").read_text(encoding="utf-8")
    section, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == name
        elif inside:
            section.append(line)
    return "\n".join(section).strip()


# ---------------------------------------------------------- selection, conversion


def _select(
    batches: Iterable[_Batch],
    classes: tuple[int, ...] | None,
    limit: int | None,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps ``classes`` then the first ``limit`` images, reading batches lazily."""
    xs, ys, kept, seen, reached_end = [], [], 0, set(), False
    for x, y, reached_end in batches:  # noqa: B007 (read after the loop)
        seen.update(np.unique(y).tolist())
        if classes is not None:
            keep = np.isin(y, classes)
            x, y = x[keep], y[keep]
        if limit is not None:
            x, y = x[: limit - kept], y[: limit - kept]
        xs.append(x)
        ys.append(y)
        kept += len(y)
        if limit is not None and kept >= limit:
            break
    if classes is not None and reached_end:
        missing = sorted(set(classes) - seen)
        if missing:
            raise ValueError(
                f"classes={list(classes)}: labels {missing} do not occur in {where} "
                f"(labels present: {sorted(seen)})"
            )
    if kept == 0:
        raise ValueError(f"no images selected from {where} (classes={classes}, limit={limit})")
    return np.concatenate(xs), np.concatenate(ys)


def _to_float(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """uint8 NHWC -> float32 in [-1, 1], optionally center-cropped and resized."""
    n, h, w, c = images.shape
    if image_size is None or h == w == image_size:
        out = images.astype(np.float32)
        out /= 127.5
        out -= 1.0
        return out
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, top : top + side, left : left + side]
    weights = _resize_weights(side, image_size)  # [image_size, side]
    out = np.empty((n, image_size, image_size, c), np.float32)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = np.moveaxis(images[start : start + _RESIZE_CHUNK], -1, 1).astype(np.float32)
        chunk /= 255.0  # [B, C, side, side] in [0, 1]
        resized = weights @ chunk @ weights.T  # [B, C, S, S]
        out[start : start + _RESIZE_CHUNK] = np.moveaxis(resized, 1, -1)
    out *= 2.0
    out -= 1.0
    np.clip(out, -1.0, 1.0, out=out)  # only float rounding: the weights are convex
    return out


@functools.lru_cache(maxsize=16)
def _resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` matrix of ``jax.image.resize`` bilinear+antialias.

    ``jax.image.resize`` is linear and separable and leaves axes of unchanged
    size alone, so resizing an identity matrix along one axis yields its weights.
    """
    import jax.numpy as jnp
    from jax.image import resize

    eye = jnp.eye(size_in, dtype=jnp.float32)
    return np.asarray(resize(eye, (size_out, size_in), method="bilinear", antialias=True))
