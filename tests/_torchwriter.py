"""A tiny writer of ``torch.save`` files from numpy arrays, without torch (for the conversion tests).

It writes torch's zip layout (``archive/data.pkl``, ``archive/data/<key>``, ``archive/version``,
``archive/byteorder``) with a protocol-2 pickle that names the same globals torch's pickler does:
tensors through ``torch._utils._rebuild_tensor_v2`` on ``('storage', torch.FloatStorage, key,
'cpu', numel)`` persistent ids, parameters through ``torch._utils._rebuild_parameter``, modules as
``NEWOBJ`` of their class (``models.MinimalResNet``, ``torch.nn.modules.conv.Conv2d`` …) + ``BUILD``
of their ``__dict__``. The classes are never importable here: :class:`_Pickler` writes their names
without looking them up. Every other 2-D+ tensor is stored transposed (Fortran order, strides
accordingly) so that the reader's strided copy is exercised.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np


def _global(module: str, name: str) -> type:
    """A stand-in class that pickles as the global ``module.name``."""
    return type(name, (), {"_torch_global": (module, name)})


_REBUILD_TENSOR = _global("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAM = _global("torch._utils", "_rebuild_parameter")
_STORAGE = {np.dtype(np.float32): _global("torch", "FloatStorage"), np.dtype(np.int64): _global("torch", "LongStorage"),
            np.dtype(np.float64): _global("torch", "DoubleStorage")}
_CLASSES: dict[tuple[str, str], type] = {}


class _Storage:
    def __init__(self, data: np.ndarray):
        self.data = data  # 1-D, the bytes written to archive/data/<key>


class Tensor:
    """A tensor: pickles as torch does (``_rebuild_tensor_v2`` of a storage view)."""

    _count = 0

    def __init__(self, array: np.ndarray):
        a = np.asarray(array)
        Tensor._count += 1
        shape = a.shape
        if a.ndim >= 2 and Tensor._count % 2 == 0:  # column-major storage: stride[i] = prod(shape[:i])
            flat, stride = a.ravel(order="F"), [int(np.prod(shape[:i])) for i in range(a.ndim)]
        else:
            flat, stride = a.ravel(), [int(np.prod(shape[i + 1:])) for i in range(a.ndim)]
        self.storage = _Storage(flat.copy())
        self.shape, self.stride = tuple(shape), tuple(stride)

    def __reduce_ex__(self, protocol):
        return (_REBUILD_TENSOR, (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()))


class Parameter:
    """An ``nn.Parameter``: ``_rebuild_parameter`` of its tensor."""

    def __init__(self, array: np.ndarray):
        self.tensor = Tensor(array)

    def __reduce_ex__(self, protocol):
        return (_REBUILD_PARAM, (self.tensor, True, collections.OrderedDict()))


def module(qualname: str, *, params: dict | None = None, children: dict | None = None, **attrs):
    """A pickled ``nn.Module`` of class ``qualname`` (e.g. ``"torch.nn.modules.conv.Conv2d"``)."""
    mod, name = qualname.rsplit(".", 1)
    if (mod, name) not in _CLASSES:
        _CLASSES[(mod, name)] = _global(mod, name)
    obj = _CLASSES[(mod, name)]()
    obj.__dict__.update({
        "training": False,
        "_parameters": collections.OrderedDict((k, Parameter(v)) for k, v in (params or {}).items()),
        "_buffers": collections.OrderedDict(),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(children or {}),
        **attrs,
    })
    return obj


def state_dict(arrays: dict[str, np.ndarray]) -> collections.OrderedDict:
    """A torch state dict (an ``OrderedDict`` with a ``_metadata`` attribute, as torch saves it)."""
    sd = collections.OrderedDict((k, Tensor(v)) for k, v in arrays.items())
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    return sd


class _Pickler(pickle._Pickler):
    """Writes stand-in classes as the globals they name, without importing them."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[np.ndarray] = []
        self._keys: dict[int, str] = {}

    def save_global(self, obj, name=None):
        ref = getattr(obj, "_torch_global", None)
        if ref is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{ref[0]}\n{ref[1]}\n".encode())
        self.memoize(obj)

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        if id(obj) not in self._keys:
            self._keys[id(obj)] = str(len(self.storages))
            self.storages.append(obj.data)
        return ("storage", _STORAGE[obj.data.dtype], self._keys[id(obj)], "cpu", int(obj.data.size))


def save(obj, path, *, raw_pickle: bytes | None = None) -> None:
    """Write ``obj`` (modules, state dicts, plain containers of :class:`Tensor`) as ``torch.save`` would."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", raw_pickle if raw_pickle is not None else buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in enumerate(p.storages):
            z.writestr(f"archive/data/{key}", np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())
        z.writestr("archive/version", "3\n")
