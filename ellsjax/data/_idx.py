"""IDX file reading (the MNIST / Fashion-MNIST distribution format)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Standard file stems per split; each may also carry a ".gz" suffix.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzipped or plain) into a numpy array.

    Gzip is detected from the file's first bytes, not its name. The header is
    validated: magic number ``0x0000TTDD`` (``TT`` a known IDX type, ``DD`` the
    number of dimensions) and a data size that exactly matches the dimensions.

    Args:
        path: Path of the IDX file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        A writable array in native byte order with the shape stored in the file
        (``uint8`` ``[N, 28, 28]`` for MNIST images, ``[N]`` for labels).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not valid IDX (bad gzip stream, bad magic
            number, truncated or oversized data); the message names the file.

    Example:
        >>> import os, struct, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")  # MNIST's first labels
        >>> with open(path, "wb") as f:
        ...     _ = f.write(struct.pack(">I", 0x00000801) + struct.pack(">I", 3) + bytes([5, 0, 4]))
        >>> read_idx(path)
        array([5, 0, 4], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: path={str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"IDX file {str(path)!r} is a corrupt or truncated gzip stream: {e}"
            ) from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() or "<empty>"
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number 0x{magic})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {str(path)!r} has {len(raw) - header} data bytes but its header "
            f"(shape {shape}, {dtype.name}) needs {expected}: truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_pair(directory: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """Returns the (images, labels) IDX paths of ``split`` in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX directory not found: path={str(directory)!r}")
    found = []
    for stem in IDX_FILES[split]:
        candidates = [directory / f"{stem}.gz", directory / stem]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            raise FileNotFoundError(
                f"IDX file for split={split!r} not found in path={str(directory)!r}: "
                f"expected {stem}.gz or {stem}"
            )
        found.append(match)
    return found[0], found[1]


def read_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and cross-checks the images ``[N,H,W]`` and labels ``[N]`` of a split."""
    images_path, labels_path = find_idx_pair(directory, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"IDX file {str(images_path)!r} should hold uint8 images [N,H,W] (magic 0x00000803), "
            f"got {images.dtype.name} with shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"IDX file {str(labels_path)!r} should hold uint8 labels [N] (magic 0x00000801), "
            f"got {labels.dtype.name} with shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"IDX files disagree: {str(images_path)!r} has {len(images)} images but "
            f"{str(labels_path)!r} has {len(labels)} labels"
        )
    return images, labels
