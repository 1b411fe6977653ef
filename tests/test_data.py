"""Tests for ellsjax.data. Offline and fast: nothing here may touch the network."""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ellsjax.data as data
from tests.conftest import REPO, SHARED, load_script
from tests.conftest import needs_shared as _needs_shared

BUNDLED_DIR = REPO / "ellsjax" / "data" / "_bundled"
FIRST_LABELS = {
    "mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    "fashion_mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
}

needs_shared = _needs_shared("mnist.npz")


def to_float(raw: np.ndarray) -> np.ndarray:
    """Reference pixel mapping: uint8 p -> p / 127.5 - 1 (float32), NHWC."""
    raw = raw if raw.ndim == 4 else raw[..., None]
    return raw.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Writes ``array`` (uint8 or int32) as a valid IDX file, gzipped or not."""
    array = np.asarray(array)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
    return path


def tiny_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    return images, labels


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A directory with the four MNIST IDX files (tiny, random, train gzipped, test plain)."""
    d = tmp_path / "idx"
    d.mkdir()
    splits = {"train": tiny_split(23, 0), "test": tiny_split(7, 1)}
    for split, prefix, gz in (("train", "train", True), ("test", "t10k", False)):
        suffix = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", splits[split][0], gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", splits[split][1], gz)
    return d, splits


# ------------------------------------------------------------------------ bundled


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_load(name, split):
    images, labels = data.load(name, split=split)
    n = data.bundled_info()[name][split]["num_images"]
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(np.unique(labels).tolist()) == set(range(10))
    if split == "train":
        assert labels[:10].tolist() == FIRST_LABELS[name]
    # every float pixel is exactly float32(p / 127.5 - 1) for an integer p in 0..255
    p = np.round((images + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(images, to_float(p))


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_bundled_equals_first_images_of_shared(name):
    with np.load(SHARED / f"{name}.npz") as full:
        for split in ("train", "test"):
            images, labels = data.load(name, split=split)
            n = len(labels)
            np.testing.assert_array_equal(images, to_float(full[f"x_{split}"][:n]))
            np.testing.assert_array_equal(labels, full[f"y_{split}"][:n].astype(np.int32))


def test_bundled_size_and_info():
    files = sorted(BUNDLED_DIR.iterdir())
    assert {f.name for f in files} >= {"mnist.npz", "fashion_mnist.npz", "LICENSES.md"}
    assert sum(f.stat().st_size for f in files) < 2_000_000
    info = data.bundled_info()
    assert set(info) == {"mnist", "fashion_mnist"}
    for splits in info.values():
        assert set(splits) == {"train", "test"}
        for entry in splits.values():
            sha = hashlib.sha256((BUNDLED_DIR / entry["file"]).read_bytes()).hexdigest()
            assert entry["sha256"] == sha
            assert 0 < entry["num_images"] < entry["total_images"]
            assert f"first {entry['num_images']}" in entry["license"]
    assert "CC BY-SA 3.0" in info["mnist"]["train"]["license"]
    assert "Burges" in info["mnist"]["train"]["license"]
    assert "MIT" in info["fashion_mnist"]["test"]["license"]
    assert "Zalando SE" in info["fashion_mnist"]["test"]["license"]


@needs_shared
def test_make_bundled_data_script_is_reproducible(tmp_path):
    script = load_script("make_bundled_data")
    # the data this suite found (ELLSJAX_SHARED_DATA or ../shared/data), not the script's own default
    assert script.main(["--source-dir", str(SHARED), "--out-dir", str(tmp_path)]) == 0
    for f in ("mnist.npz", "fashion_mnist.npz", "LICENSES.md"):
        assert (tmp_path / f).read_bytes() == (BUNDLED_DIR / f).read_bytes(), f


def test_image_size_resizes_like_jax():
    import jax

    images, _ = data.load("mnist", image_size=32, limit=64)
    assert images.shape == (64, 32, 32, 1) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    native, _ = data.load("mnist", limit=64)
    ref = jax.image.resize((native + 1) / 2, (64, 32, 32, 1), "bilinear", antialias=True)
    np.testing.assert_allclose(images, np.asarray(ref) * 2 - 1, atol=1e-6)
    same, _ = data.load("mnist", image_size=28, limit=64)
    np.testing.assert_array_equal(same, native)
    small, _ = data.load("fashion_mnist", image_size=12, limit=8)
    assert small.shape == (8, 12, 12, 1) and small.min() >= -1 and small.max() <= 1


def test_limit_and_classes():
    all_images, all_labels = data.load("mnist")
    images, labels = data.load("mnist", limit=10)
    assert labels.tolist() == FIRST_LABELS["mnist"]
    np.testing.assert_array_equal(images, all_images[:10])
    images, labels = data.load("mnist", classes=[7, 3], limit=25)
    keep = np.flatnonzero(np.isin(all_labels, [3, 7]))[:25]
    np.testing.assert_array_equal(labels, all_labels[keep])
    np.testing.assert_array_equal(images, all_images[keep])
    _, labels = data.load("fashion_mnist", split="test", classes=(9,))
    assert len(labels) > 0 and set(labels.tolist()) == {9}


# ---------------------------------------------------------------------------- npz


@needs_shared
def test_npz_source_on_shared_data():
    with np.load(SHARED / "mnist.npz") as full:
        x, y = full["x_test"][:100], full["y_test"][:100]
    for path in (SHARED, SHARED / "mnist.npz"):
        images, labels = data.load("mnist", split="test", source="npz", path=path, limit=100)
        np.testing.assert_array_equal(images, to_float(x))
        np.testing.assert_array_equal(labels, y.astype(np.int32))
    images, labels = data.load("cifar10", source="npz", path=SHARED, limit=10)
    assert images.shape == (10, 32, 32, 3)
    assert labels.tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_npz_source_on_tiny_file(tmp_path):
    x_train = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4) * 3  # no channel axis
    x_train[0, 0, 0], x_train[0, 0, 1] = 0, 255
    y_train = np.array([1, 0, 1, 2, 1], np.uint8)
    path = tmp_path / "mnist.npz"
    # 4x4 images are not MNIST's 28x28: the file's own 'name' entry declares them a (resized) copy
    np.savez_compressed(
        path, x_train=x_train, y_train=y_train, x_test=x_train[:2], y_test=y_train[:2], name="mnist"
    )
    images, labels = data.load("mnist", source="npz", path=tmp_path)
    assert images.shape == (5, 4, 4, 1) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, to_float(x_train))
    assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 1, 0] == 1.0
    images, labels = data.load("mnist", source="npz", path=path, classes=[1], limit=2)
    assert labels.tolist() == [1, 1]
    np.testing.assert_array_equal(images, to_float(x_train[[0, 2]]))
    _, labels = data.load("mnist", split="test", source="npz", path=path)
    assert labels.tolist() == [1, 0]


def test_npz_celeb_a_without_labels_is_center_cropped(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 218, 178, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "celeb_a.npz", x_train=x)
    images, labels = data.load("celeb_a", source="npz", path=tmp_path, image_size=64)
    assert images.shape == (3, 64, 64, 3) and labels.tolist() == [0, 0, 0]
    assert images.min() >= -1.0 and images.max() <= 1.0
    square, _ = data.load("celeb_a", source="npz", path=tmp_path, image_size=178)
    np.testing.assert_array_equal(square, to_float(x[:, 20:198]))  # crop only


def test_npz_corrupt_file_names_path(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(ValueError, match="mnist.npz"):
        data.load("mnist", source="npz", path=bad)
    np.savez_compressed(bad, x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="split='test'"):
        data.load("mnist", split="test", source="npz", path=bad)


# ---------------------------------------------------------------------------- idx


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "a.gz", a)), a)
    b = np.array([-7, 0, 70000], np.int32)
    out = data.read_idx(write_idx(tmp_path / "b", b, gz=False))
    np.testing.assert_array_equal(out, b)
    assert out.dtype == np.int32 and out.dtype.isnative


def test_idx_source_exact(idx_dir):
    d, splits = idx_dir
    for split, (x, y) in splits.items():
        images, labels = data.load("mnist", split=split, source="idx", path=d)
        np.testing.assert_array_equal(images, to_float(x))
        np.testing.assert_array_equal(labels, y.astype(np.int32))
    _, labels = data.load("fashion_mnist", source="idx", path=d, limit=4, classes=[7])
    assert labels.tolist() == [7, 7, 7]  # labels k*7 % 10 == 7 for k = 1, 11, 21


def test_idx_corrupt_files_name_the_file(idx_dir, tmp_path):
    d, _ = idx_dir
    images_gz = d / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images_gz.read_bytes())
    images_gz.write_bytes(gzip.compress(raw[:-10]))  # truncated payload
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.load("mnist", source="idx", path=d)
    images_gz.write_bytes(images_gz.read_bytes()[:40])  # truncated gzip stream
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.read_idx(images_gz)
    bad_magic = tmp_path / "bad-idx"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad-idx"):
        data.read_idx(bad_magic)
    labels = d / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(6, np.uint8), gz=False)  # 7 images, 6 labels
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", split="test", source="idx", path=d)
    (d / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="path="):
        data.load("mnist", split="test", source="idx", path=d)


# --------------------------------------------------------------------------- tfds


def test_tfds_offline_builder_roundtrip(idx_dir, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    d, splits = idx_dir
    data_dir = tmp_path / "tfds"
    prepared = data.prepare_tfds("mnist", d, data_dir)
    assert Path(prepared).is_dir() and "ellsjax_mnist" in prepared
    for split, (x, y) in splits.items():
        images, labels = data.load("mnist", split=split, source="tfds", data_dir=data_dir)
        np.testing.assert_array_equal(images, to_float(x))
        np.testing.assert_array_equal(labels, y.astype(np.int32))
    images, labels = data.load("mnist", source="tfds", data_dir=data_dir, limit=5, image_size=32)
    assert images.shape == (5, 32, 32, 1) and labels.tolist() == splits["train"][1][:5].tolist()
    _, labels = data.load("mnist", source="tfds", data_dir=data_dir, classes=[3, 4], limit=3)
    assert labels.tolist() == [x for x in splits["train"][1].tolist() if x in (3, 4)][:3]
    with pytest.raises(ValueError, match="classes="):
        data.load("mnist", split="test", source="tfds", data_dir=data_dir, classes=[1, 3])
    # Nothing prepared for fashion_mnist here: a clear error, no download attempt.
    with pytest.raises(FileNotFoundError, match="data_dir="):
        data.load("fashion_mnist", source="tfds", data_dir=data_dir)


def test_tfds_mock_data_cifar10_and_celeb_a(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    real_data_source = tfds.data_source

    def data_source(*args, **kwargs):
        # tfds 4.9.10's mock installs `__getitems__` unbound on a MagicMock, so it
        # is called without `self`; route it through the working `__getitem__`.
        source = real_data_source(*args, **kwargs)
        inner = source.data_source
        inner.__getitems__ = lambda keys: [inner[k] for k in keys]
        return source

    monkeypatch.setattr(tfds, "data_source", data_source)
    try:
        with tfds.testing.mock_data(num_examples=6):
            images, labels = data.load("cifar10", source="tfds", data_dir=tmp_path, limit=4)
            celeb, celeb_labels = data.load(
                "celeb_a", split="validation", source="tfds", data_dir=tmp_path, image_size=16
            )
    except Exception as e:  # pragma: no cover - only where mocking needs TensorFlow
        if "tensorflow" in str(e).lower():
            pytest.skip(f"tfds.testing.mock_data needs TensorFlow here: {e}")
        raise
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.dtype == np.int32 and set(labels.tolist()) <= set(range(10))
    assert celeb.shape == (6, 16, 16, 3) and celeb_labels.tolist() == [0] * 6


def test_tfds_missing_install_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'ellsjax\[tfds\]'"):
        data.load("mnist", source="tfds")


def test_import_does_not_import_tfds():
    code = (
        "import sys, ellsjax.data; "
        "assert 'tensorflow_datasets' not in sys.modules; "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- auto


def test_auto_source(monkeypatch, tmp_path):
    monkeypatch.delenv("ELLSJAX_DATA_DIR", raising=False)
    images, labels = data.load("mnist", source="auto", limit=50)
    np.testing.assert_array_equal(images, data.load("mnist", limit=50).images)
    x = np.full((3, 28, 28), 255, np.uint8)
    np.savez_compressed(tmp_path / "mnist.npz", x_train=x, y_train=np.arange(3, dtype=np.uint8))
    monkeypatch.setenv("ELLSJAX_DATA_DIR", str(tmp_path))
    # More than is bundled (or no limit at all): the npz in $ELLSJAX_DATA_DIR.
    _, labels = data.load("mnist", source="auto")
    assert labels.tolist() == [0, 1, 2]
    _, labels = data.load("mnist", source="auto", limit=10**6)
    assert labels.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "imagenet"}, ValueError, "name='imagenet'.*mnist, fashion_mnist, cifar10"),
        ({"split": "validation"}, ValueError, "split='validation'"),
        ({"source": "internet"}, ValueError, "source='internet'"),
        ({"limit": 0}, ValueError, "limit="),
        ({"limit": -3}, ValueError, "limit="),
        ({"limit": 2.5}, ValueError, "limit="),
        ({"image_size": 0}, ValueError, "image_size="),
        ({"classes": [3, 42]}, ValueError, r"classes=.*\[42\]"),
        ({"classes": []}, ValueError, "classes="),
        ({"limit": 10**6}, ValueError, "limit="),
        ({"name": "cifar10"}, ValueError, "name='cifar10'.*bundled: mnist"),
        ({"source": "npz"}, ValueError, "path="),
        ({"source": "npz", "path": "/nonexistent/x.npz"}, FileNotFoundError, "path=.*nonexistent"),
        ({"source": "idx", "path": "/nonexistent"}, FileNotFoundError, "path=.*nonexistent"),
        ({"name": "cifar10", "source": "idx", "path": "."}, ValueError, "name='cifar10'"),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    kwargs = {"name": "mnist", **kwargs}
    with pytest.raises(error, match=match):
        data.load(kwargs.pop("name"), **kwargs)


def test_prepare_tfds_errors(tmp_path):
    with pytest.raises(ValueError, match="name='cifar10'"):
        data.prepare_tfds("cifar10", tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="manual_dir="):
        data.prepare_tfds("mnist", tmp_path / "missing", tmp_path)


def test_public_api():
    assert data.DATASETS == ("mnist", "fashion_mnist", "cifar10", "celeb_a")
    assert set(data.__all__) == {
        "DATASETS", "Dataset", "bundled_info", "load", "prepare_tfds", "read_idx",
    }  # fmt: skip
    ds = data.load("fashion_mnist", split="test", limit=3)
    assert isinstance(ds, data.Dataset) and ds.labels.tolist() == [9, 2, 1]
