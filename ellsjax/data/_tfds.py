"""tensorflow-datasets integration, without TensorFlow and without downloading.

Imported lazily by :mod:`ellsjax.data` (only for ``source="tfds"`` and
:func:`ellsjax.data.prepare_tfds`), so ``import ellsjax`` never imports tfds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ellsjax.data._idx import IDX_FILES, read_idx_split

OFFICIAL_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar10",
    "celeb_a": "celeb_a",
}

_MANUAL_INSTRUCTIONS = """\
Put the four IDX files of the dataset, gzipped or not, in `manual_dir`:
train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.
"""


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds an MNIST-format dataset from IDX files in ``manual_dir``.

    Unlike the official tfds builders this needs no TensorFlow: images are stored
    as raw ``uint8`` tensors (``features.Tensor``, not ``features.Image``) in
    ``array_record`` files, in the original file order (``disable_shuffling``).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "IDX files from manual_dir, uint8 tensors, original order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    CLASS_NAMES: tuple[str, ...] = ()
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    def _split_generators(self, dl_manager):
        manual_dir = Path(os.fspath(dl_manager.manual_dir))
        generators = {}
        for split in IDX_FILES:
            images, labels = read_idx_split(manual_dir, split)
            if images.shape[1:] != (28, 28):
                raise ValueError(
                    f"{self.name}: IDX images in {str(manual_dir)!r} are "
                    f"{images.shape[1:]}, expected (28, 28)"
                )
            generators[split] = self._generate_examples(images, labels)
        return generators

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator:
        for i in range(len(images)):
            yield i, {"image": images[i, :, :, None], "label": int(labels[i])}


class EllsjaxMnist(_IdxBuilder):
    """MNIST from its IDX files, prepared without TensorFlow."""

    name = "ellsjax_mnist"
    CLASS_NAMES = tuple(str(i) for i in range(10))
    DESCRIPTION = "MNIST handwritten digits (LeCun, Cortes, Burges), CC BY-SA 3.0."
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"


class EllsjaxFashionMnist(_IdxBuilder):
    """Fashion-MNIST from its IDX files, prepared without TensorFlow."""

    name = "ellsjax_fashion_mnist"
    CLASS_NAMES = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip
    DESCRIPTION = "Fashion-MNIST (Zalando SE), MIT license."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


BUILDERS: dict[str, type[_IdxBuilder]] = {
    "mnist": EllsjaxMnist,
    "fashion_mnist": EllsjaxFashionMnist,
}


def _data_dir_arg(data_dir: str | os.PathLike | None) -> str | None:
    return None if data_dir is None else os.fspath(data_dir)


def prepare(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None) -> str:
    """Prepares ``ellsjax_{name}`` from IDX files; returns the prepared directory."""
    read_idx_split(manual_dir, "train")  # fail early, with our own messages
    read_idx_split(manual_dir, "test")
    builder = BUILDERS[name](data_dir=_data_dir_arg(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return os.fspath(builder.data_dir)


def resolve_name(name: str, data_dir: str | os.PathLike | None) -> str:
    """The ellsjax builder's name if it is prepared in ``data_dir``, else the official one."""
    builder_cls = BUILDERS.get(name)
    if builder_cls is not None and builder_cls(data_dir=_data_dir_arg(data_dir)).is_prepared():
        return builder_cls.name
    return OFFICIAL_NAMES[name]


def iter_batches(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None,
    count: int | None,
    batch_size: int = 1024,
) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """Yields ``(images uint8 [B,H,W,C], labels [B], reached_end)`` in record order.

    Reads at most ``count`` records (all if None) with ``__getitems__`` batches.
    ``reached_end`` is True for the batch holding the split's last record.
    Records without a ``label`` field (celeb_a) get label 0.
    """
    tfds_name = resolve_name(name, data_dir)
    try:
        source = tfds.data_source(
            tfds_name, split=split, data_dir=_data_dir_arg(data_dir), download=False
        )
    except ImportError:
        raise
    except Exception as e:  # tfds raises assorted types for "not prepared here"
        hint = (
            f" Prepare it offline with ellsjax.data.prepare_tfds({name!r}, manual_dir=..., "
            "data_dir=...) from the IDX files,"
            if name in BUILDERS
            else ""
        )
        raise FileNotFoundError(
            f"tfds dataset {tfds_name!r} split={split!r} is not available as array_record "
            f"data in data_dir={None if data_dir is None else os.fspath(data_dir)!r} "
            f"(download=False: ellsjax never downloads).{hint} or use source='npz'/'idx'/"
            f"'bundled'. tfds said: {type(e).__name__}: {e}"
        ) from e
    size = len(source)
    total = size if count is None else min(count, size)
    if total == 0:
        yield np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int64), True
        return
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        records = source.__getitems__(list(range(start, stop)))
        images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records])
        if images.ndim == 3:
            images = images[..., None]
        labels = np.array([int(r.get("label", 0)) for r in records], dtype=np.int64)
        yield images, labels, stop == size
