"""Image datasets for ellsjax: MNIST, Fashion-MNIST, CIFAR-10 and CelebA.

Everything comes back as numpy: float32 NHWC images in ``[-1, 1]`` (uint8 ``p``
maps to ``p / 127.5 - 1``) and int32 labels, in the original dataset order.

Small prefixes of MNIST and Fashion-MNIST ship with the package (``source=
"bundled"``, the default), so tests and examples run offline with no setup. Full
data comes from ``.npz`` files, raw IDX files, or tensorflow-datasets (used
without TensorFlow and never downloading; imported only when asked for).

Example:
    >>> import ellsjax.data
    >>> images, labels = ellsjax.data.load("fashion_mnist", split="test", limit=4)
    >>> images.shape, float(images.min()) >= -1.0, labels.tolist()
    ((4, 28, 28, 1), True, [9, 2, 1, 1])
"""

from ellsjax.data._idx import read_idx
from ellsjax.data._load import DATASETS, Dataset, bundled_info, load, prepare_tfds

__all__ = ["DATASETS", "Dataset", "bundled_info", "load", "prepare_tfds", "read_idx"]
