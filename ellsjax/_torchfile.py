"""A restricted reader of PyTorch checkpoints that needs no torch and runs no code from the file.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle of the saved object) and one
raw little-endian storage per tensor in ``<name>/data/<key>``. A pickle is a small program that
can import and call any Python object it names, so unpickling a downloaded file with ``pickle``
(or ``torch.load(weights_only=False)``) can run arbitrary code. This reader unpickles with a fixed
table of the globals a checkpoint needs and never imports or calls anything the file names:

* tensors and parameters (``torch._utils._rebuild_tensor_v2`` …) become ``numpy`` arrays, copied
  out of their storage with bounds checks;
* ``collections.OrderedDict``, ``set``, ``frozenset`` are the real containers;
* classes of ``torch.nn`` modules and of the known model definitions (Kamb & Ganguli's
  ``models.py``, the DDPM UNet of ``local_diffusion``/pytorch-ddpm) become inert
  :class:`TorchObject` records holding the module's pickled ``__dict__`` (its ``_modules``,
  ``_parameters``, ``_buffers`` and plain attributes), so the architecture can be read from them;
* any other global is an error that names it.

Why not a library: ``ptloader`` (numpy only) and ``pt-loader`` read weights-only checkpoints and
refuse whole pickled modules, which is how the Kamb & Ganguli backbones were saved; ``fickling``
analyses pickles but does not build the objects. The format is small enough to read here.

Example:
    >>> import io, zipfile, pickle, collections
    >>> buf = io.BytesIO()
    >>> with zipfile.ZipFile(buf, "w") as z:
    ...     z.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(step=3), protocol=2))
    >>> dict(load(buf))
    {'step': 3}
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["TorchObject", "load", "UnsafeCheckpointError"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global this reader does not know (it was not imported)."""


def _bfloat16():
    import ml_dtypes  # installed with jax

    return np.dtype(ml_dtypes.bfloat16)


# torch's storage classes (the pickle names them in each storage's persistent id) -> element dtype
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}

# Model definitions whose classes may appear in a whole pickled module: module path -> class names.
_MODEL_CLASSES: dict[str, frozenset[str]] = {
    # Kamb & Ganguli, github.com/Kambm/convolutional_diffusion, models.py
    "models": frozenset({"MinimalResNet", "MinimalUNet", "UBlock", "EmbeddingModule", "DDIM"}),
    # Lukoianov et al., github.com/ottogin/locality-in-diffusion-models (pytorch-ddpm's model.py)
    "local_diffusion.utils.neural_networks": frozenset({
        "UNet", "ResBlock", "AttnBlock", "DownSample", "UpSample", "TimeEmbedding", "Swish", "FlattenLinear"}),
    "model": frozenset({"UNet", "ResBlock", "AttnBlock", "DownSample", "UpSample", "TimeEmbedding", "Swish"}),
}


class _StorageType:
    """Marker for a torch storage class (``torch.FloatStorage`` …): only its dtype is used."""

    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        d = _STORAGE_DTYPES[self.name]
        return np.dtype(d() if callable(d) and not isinstance(d, type) else d)


class TorchObject:
    """An inert record of a pickled object of a class this reader will not import.

    ``qualname`` is the class's ``module.Name`` in the file; ``state`` the pickled ``__dict__``
    (for a ``torch.nn.Module``: ``_modules``, ``_parameters``, ``_buffers`` and its plain
    attributes, e.g. ``padding_mode``); ``args`` the constructor arguments the pickle passed, if any.
    Attribute access reads ``state``: ``obj.padding_mode``, ``obj._modules``.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", {})
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"checkpoint: {self.qualname} has a non-dict state ({type(state).__name__})")
        self.state.update(state)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.__dict__["state"][name]
        except KeyError:
            raise AttributeError(f"{self.qualname} has no attribute {name!r}") from None

    @property
    def type_name(self) -> str:
        """The class's own name (``"Conv2d"``, ``"MinimalResNet"``)."""
        return self.qualname.rsplit(".", 1)[-1]

    @property
    def children(self) -> dict[str, Any]:
        """The submodules (``_modules``), in order."""
        return dict(self.state.get("_modules") or {})

    @property
    def parameters(self) -> dict[str, Any]:
        """The module's own parameters and buffers (``None`` entries dropped)."""
        out = {k: v for k, v in (self.state.get("_parameters") or {}).items() if v is not None}
        out.update({k: v for k, v in (self.state.get("_buffers") or {}).items() if v is not None})
        return out

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The module tree's parameters and buffers under torch's dotted names (``embs.0.1.weight``)."""
        out = {prefix + k: v for k, v in self.parameters.items()}
        for name, child in self.children.items():
            if isinstance(child, TorchObject):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out

    def __repr__(self):
        return f"<{self.qualname} (inert record)>"


def _record_class(module: str, name: str) -> type:
    return type(name, (TorchObject,), {"qualname": f"{module}.{name}", "__module__": __name__})


def _fresh(fn):
    """A new function object per read that calls ``fn``: a pickle's BUILD on a global it names
    (setting attributes on it) then changes only this read's copy, never this module."""
    return lambda *args: fn(*args)


def _tensor(storage, offset, size, stride, *rest):
    """``torch._utils._rebuild_tensor_v2``: a strided view of a storage, copied to a new array."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError(f"checkpoint: a tensor refers to {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise pickle.UnpicklingError(f"checkpoint: a tensor has a bad layout (size {size}, stride {stride}, "
                                     f"offset {offset})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > storage.size:
        raise pickle.UnpicklingError(f"checkpoint: a tensor of size {size} reads past its storage "
                                     f"({extent} > {storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _legacy_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _parameter(data, *rest):
    """``torch._utils._rebuild_parameter[_with_state]``: the parameter's data."""
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError(f"checkpoint: a parameter holds {type(data).__name__}, not a tensor")
    return data


def _from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: a tensor subclass; the array of the plain tensor."""
    if not callable(func) or not isinstance(args, tuple):
        raise pickle.UnpicklingError(f"checkpoint: a tensor is rebuilt by {func!r:.80}, which this reader does not know")
    out = func(*args)  # func came from find_class: one of this module's rebuild functions or a container
    if not isinstance(out, np.ndarray):
        raise pickle.UnpicklingError(f"checkpoint: a tensor subclass rebuilt as {type(out).__name__}, not a tensor")
    return out


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_tensor"): _legacy_tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}
        self._globals: dict[tuple[str, str], Any] = {}  # one object per name and read

    def find_class(self, module, name):
        if (module, name) not in self._globals:
            self._globals[(module, name)] = self._resolve(module, name)
        return self._globals[(module, name)]

    def _resolve(self, module, name):
        if (module, name) in _FUNCTIONS:
            fn = _FUNCTIONS[(module, name)]
            # built-in types (OrderedDict, set, tuple) refuse attribute writes; functions get a copy
            return fn if isinstance(fn, type) else _fresh(fn)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module == "torch" and name == "Tensor") or (module == "torch.nn.parameter" and name == "Parameter"):
            return _record_class(module, name)  # only ever a marker argument of _rebuild_from_type_v2
        if module.startswith("torch.nn.modules.") or name in _MODEL_CLASSES.get(module, ()):
            return _record_class(module, name)
        raise UnsafeCheckpointError(
            f"checkpoint: the pickle names the global {module}.{name}, which this reader does not know; it was "
            "not imported (a checkpoint may only hold tensors, plain containers and torch.nn / known model modules)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"checkpoint: unknown persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"checkpoint: a storage of unknown type {stype!r:.80}")
        key = str(key)
        if key not in self._storages:
            path = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(path)
            except KeyError:
                raise pickle.UnpicklingError(f"checkpoint: the archive lacks the storage {path}") from None
            dtype = stype.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if stype.name == "UntypedStorage":
                dtype = np.dtype(np.uint8)
            if len(raw) % dtype.itemsize:
                raise pickle.UnpicklingError(f"checkpoint: storage {path} holds {len(raw)} bytes, not a whole "
                                             f"number of {dtype} elements")
            arr = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
            if int(numel) > arr.size:
                raise pickle.UnpicklingError(f"checkpoint: storage {path} holds {arr.size} elements, the pickle "
                                             f"says {numel}")
            self._storages[key] = arr
        return self._storages[key]


def load(file: str | os.PathLike | BinaryIO) -> Any:
    """Read a ``torch.save`` checkpoint (zip format) into numpy arrays, containers and inert records.

    Args:
        file: a path or a binary file object.

    Returns:
        The saved object: a dict / ``OrderedDict`` of arrays for a state dict, a :class:`TorchObject`
        for a whole pickled module.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch zip checkpoint (e.g. the legacy pre-1.6 format).
        UnsafeCheckpointError: the pickle names a global this reader does not know.
        pickle.UnpicklingError: a malformed pickle or storage.
    """
    if isinstance(file, (str, os.PathLike)):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"file: no such checkpoint: {file}")
        with open(file, "rb") as f:
            return load(io.BytesIO(f.read()))
    if not zipfile.is_zipfile(file):
        raise ValueError("file: not a PyTorch zip checkpoint (torch.save since torch 1.6 writes a zip archive; "
                         "re-save an older file with a recent torch, or save its state_dict)")
    file.seek(0)
    with zipfile.ZipFile(file) as z:
        pkls = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"file: expected one <name>/data.pkl in the archive, found {pkls or 'none'}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in z.namelist():
            byteorder = z.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"file: unknown byte order {byteorder!r}")
        return _Unpickler(io.BytesIO(z.read(pkls[0])), z, prefix, byteorder).load()
