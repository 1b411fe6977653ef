"""Fixtures and helpers shared by the test modules.

Real datasets: tests that need the full MNIST / Fashion-MNIST / CIFAR-10 subset read them from
``ELLSJAX_SHARED_DATA`` or, by default, ``../shared/data`` next to the clone (the project's offline
copies; see its README). Without them those tests skip and say where they looked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The suite compiles hundreds of small XLA programs and runs each once or twice: XLA's optimization
# passes cost more than they save here (measured: 570 → 456 CPU-seconds for the whole suite). What
# the tests check is this library's arithmetic, which the passes do not change beyond float32
# rounding order; benchmarks and users run fully optimized. Must be set before JAX initializes.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Likewise XLA:CPU's MLIR fusion emitters: they take longer to compile a small program than the older
# elemental emitters, which compute the same operations (measured on 13 machine tests: 32.5 → 20.1
# CPU-seconds; the whole suite in CONTRIBUTING.md's test budget). Appended, so a user's own XLA_FLAGS still apply.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# Many tests build the same small programs again (a fresh closure per call, the CLI and multi-process
# tests in new interpreters): a compilation cache for this session, from the first compile on, turns
# each repeat into a disk read. A fresh directory per session, removed at its end: nothing persists
# between runs, so every run still compiles everything it tests at least once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="ellsjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Shape annotations are checked at run time in the tests (jaxtyping + beartype, as diffrax does):
# every function and dataclass of ellsjax imported from here on is wrapped by jaxtyping.jaxtyped,
# checking its array annotations (dtype, rank, named dimensions consistent across the arguments
# and the result; tests/_shapecheck.py). Must come before the first import of ellsjax.
# ELLSJAX_SHAPECHECK=0 turns it off (to time the suite without it).
if os.environ.get("ELLSJAX_SHAPECHECK", "1") != "0":
    import jaxtyping

    import tests._shapecheck  # noqa: F401  (the hook looks the checker up as an attribute of `tests`)

    jaxtyping.install_import_hook("ellsjax", "tests._shapecheck.shapes")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ELLSJAX_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_REFERENCE = SHARED.parent / "reference"


def needs_shared(filename: str = "mnist.npz"):
    """Skip unless the real dataset file ``filename`` is in :data:`SHARED`, saying where it was looked for."""
    return pytest.mark.skipif(
        not (SHARED / filename).is_file(),
        reason=f"needs the real dataset {filename} in {SHARED} (the project's offline copies in ../shared/data next "
               "to the clone, or set ELLSJAX_SHARED_DATA); the bundled subset is too small for this test",
    )


def load_script(name: str):
    """The module ``scripts/<name>.py`` (scripts are not a package), loaded for a test to call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def unchecked_shapes():
    """Within it, jaxtyping's run-time check of shape annotations is off: for a test of the library's
    own error on a mis-shaped argument, which the annotation check would otherwise pre-empt."""
    import jaxtyping

    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)


def random_images(n: int, shape=(8, 8, 1), *, b: int = 2, seed: int = 0):
    """``n`` uniform training images in [-1, 1] and ``b`` standard-normal queries of ``shape``."""
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    return imgs, x


#: The tiny network every test trains or loads (one compiled train step for the whole suite).
def tiny_net():
    from ellsjax import nets

    return nets.NetConfig(arch="resnet", image_size=12, width=16, depth=2)


def tiny_train_config(**changes):
    from ellsjax import training

    base = dict(steps=3, batch_size=16, lr=2e-3, ema_decay=0.9, limit=32, log_every=1)
    return training.TrainConfig(**{**base, **changes})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory of :func:`tiny_net` trained 3 steps on 32 bundled MNIST images (EMA kept)."""
    from ellsjax import training

    d = tmp_path_factory.mktemp("trained_run")
    training.train(d, tiny_net(), tiny_train_config(), progress=False)
    return d


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``ellsjax reproduce --preset smoke`` through the command line (the reproduce tests read it; the
    studies test reuses it as a finished member)."""
    from ellsjax import cli

    out = tmp_path_factory.mktemp("smoke")
    assert cli.main(["reproduce", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out
