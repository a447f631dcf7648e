"""Restricted loading of FLAME model files (pickles and object ``.npy``), never ``pickle.load``.

A pickle can call any importable function while loading. ``load_model_pickle`` resolves only:

- what numpy needs to rebuild arrays, dtypes and scalars (object arrays included: their items go
  through this same unpickler);
- scipy.sparse matrix classes (FLAME's ``J_regressor``), rebuilt from their pickled state into a
  scipy ``csc_matrix`` without running scipy's own unpickling code;
- ``chumpy.ch.Ch`` (old FLAME/SMPL files), replaced by the plain numpy array it wraps, without
  importing chumpy.

Anything else (``os.system``, ``builtins.eval``, any other class) raises ``UnsafePickleError``
naming the global and the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file references a global that is not on the allow-list."""


class _PickledState:
    """Stand-in instance for an allowed foreign class: records the pickled state, runs nothing."""

    source_class = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_PickledState":
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ChumpyArray(_PickledState):
    source_class = "chumpy.ch.Ch"


class _SparseMatrix(_PickledState):
    source_class = "scipy.sparse matrix"
    format = ""


class _CscMatrix(_SparseMatrix):
    format = "csc"


class _CsrMatrix(_SparseMatrix):
    format = "csr"


class _CooMatrix(_SparseMatrix):
    format = "coo"


def _reconstruct(*args: Any) -> np.ndarray:
    # numpy's helper behind ndarray.__reduce__: allocates an empty array that BUILD then fills.
    from numpy._core.multiarray import _reconstruct as numpy_reconstruct

    return numpy_reconstruct(*args)


def _scalar(*args: Any) -> Any:
    from numpy._core.multiarray import scalar

    return scalar(*args)


def _frombuffer(*args: Any) -> np.ndarray:
    from numpy._core.numeric import _frombuffer as numpy_frombuffer

    return numpy_frombuffer(*args)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor limited to our stand-ins (protocol 0/1 pickles of new-style classes)."""
    if not (isinstance(cls, type) and issubclass(cls, _PickledState)) or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} is not allowed")
    return cls.__new__(cls)


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as protocol-0..2 pickles use it for bytes (e.g. numpy buffers): str -> bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,  # python-2 name
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("chumpy.ch", "Ch"): _ChumpyArray,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
for _module in ("scipy.sparse", "scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr",
                "scipy.sparse.coo", "scipy.sparse._coo"):
    for _cls in (_CscMatrix, _CsrMatrix, _CooMatrix):
        _ALLOWED[(_module, f"{_cls.format}_matrix")] = _cls
del _core, _module, _cls


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; ``source`` names the file in errors."""

    def __init__(self, stream: io.BufferedIOBase, source: str) -> None:
        super().__init__(stream, encoding="latin1")  # python-2 pickles (FLAME 2020) hold byte strings
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global {module}.{name}; a FLAME file may only contain "
                "numpy arrays, scipy.sparse matrices and chumpy.ch.Ch arrays"
            ) from None


def _to_plain(value: Any, source: str, key: str = "") -> Any:
    """Replace stand-ins by numpy arrays / scipy sparse matrices, recursively through containers."""
    if isinstance(value, _ChumpyArray):
        state = value.state if isinstance(getattr(value, "state", None), dict) else {}
        if "x" not in state:
            raise UnsafePickleError(f"{source}: chumpy object at {key or 'top level'} has no array 'x' (only plain Ch arrays are supported)")
        return np.asarray(_to_plain(state["x"], source, key))
    if isinstance(value, _SparseMatrix):
        return _sparse_from_state(value.format, getattr(value, "state", None), source, key)
    if isinstance(value, dict):
        return {k: _to_plain(v, source, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v, source, key) for v in value)
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        if value.ndim == 0:
            return _to_plain(value.item(), source, key)
        return np.array([_to_plain(v, source, key) for v in value.ravel()], dtype=object).reshape(value.shape)
    return value


def _sparse_from_state(fmt: str, state: Any, source: str, key: str):
    from scipy import sparse

    if not isinstance(state, dict):
        raise UnsafePickleError(f"{source}: sparse matrix at {key or 'top level'} has no state dict")
    shape = state.get("_shape", state.get("shape"))
    try:
        if fmt in ("csc", "csr"):
            cls = sparse.csc_matrix if fmt == "csc" else sparse.csr_matrix
            return cls((np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"])), shape=tuple(shape))
        # Newer scipy stores coo indices as "coords", older as "row"/"col".
        row, col = state["coords"] if "coords" in state else (state["row"], state["col"])
        return sparse.coo_matrix((np.asarray(state["data"]), (np.asarray(row), np.asarray(col))), shape=tuple(shape))
    except (KeyError, TypeError, ValueError) as err:
        raise UnsafePickleError(f"{source}: malformed sparse matrix at {key or 'top level'}: {err}") from None


def load_model_pickle(path: str | Path) -> Any:
    """Load a FLAME-style pickle (or an object ``.npy`` such as DECA's landmark embedding) safely.

    Returns plain Python containers of numpy arrays / scipy sparse matrices. Raises
    ``UnsafePickleError`` for any disallowed global, ``ValueError`` for an unreadable file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:6] == b"\x93NUMPY":
        return _load_npy(data, str(path))
    try:
        raw = RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure is reported with the file name
        raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    return _to_plain(raw, str(path))


def _load_npy(data: bytes, source: str) -> Any:
    from numpy.lib import format as npy_format

    stream = io.BytesIO(data)
    version = npy_format.read_magic(stream)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        try:
            raw = RestrictedUnpickler(stream, source).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{source}: unreadable object array ({type(err).__name__}: {err})") from None
        return _to_plain(raw, source)
    array = np.frombuffer(stream.read(), dtype=dtype, count=int(np.prod(shape)))
    return array.reshape(shape, order="F" if fortran else "C").copy()
