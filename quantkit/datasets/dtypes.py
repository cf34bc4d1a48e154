"""Data arrays to the dtypes of the model inputs: cast when no value changes, refuse otherwise.

ONNX Runtime takes only the exact input dtype, so float64 data (NumPy's default) or int32
token ids for an int64 input would fail inside the session with a raw error. The rules:

    float -> float       float64 -> float32 (a note, once), float16 <-> float32; refused when a
                         value does not fit (overflow to inf)
    int/bool -> float    when every value is exact in the float (|v| <= 2**24 for float32)
    int/bool -> int      when every value fits the target's range (int32 <-> int64, uint8 -> int64)
    float -> int         when every value is a whole number in range (no rounding, no truncation)
    -> bool              when every value is 0 or 1
"""

from __future__ import annotations

import logging
from collections.abc import MutableSet

import numpy as np

from quantkit.errors import DatasetError

log = logging.getLogger(__name__)

#: (input, file, dtypes) of the lossless narrowing casts noted in this process
_SAID: set[tuple[str, str, str]] = set()

_EXACT_INT_IN_FLOAT = {np.dtype(np.float16): 2**11, np.dtype(np.float32): 2**24, np.dtype(np.float64): 2**53}


class DtypeMismatchError(DatasetError):
    """Data whose values cannot be given to a model input of another dtype without changing them."""


def _kind(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return "other"


def cast_for_input(arr: np.ndarray, dtype: np.dtype | str, *, name: str, where: str = "the data",
                   noted: MutableSet[str] | None = None) -> np.ndarray:
    """``arr`` as ``dtype`` when the cast keeps every value (see the module docstring).

    Args:
        arr: data for one model input.
        dtype: the input's declared dtype.
        name: the input name, for messages.
        where: the file or sample the data comes from, for messages.
        noted: names already noted; a float64 -> float32 cast is logged once per name in it.

    Raises:
        DtypeMismatchError: the cast would change values (non-integral floats for an integer
            input, out-of-range values) or the data is not numeric.
    """
    want = np.dtype(dtype)
    arr = np.asarray(arr)
    have = arr.dtype
    if have == want:
        return arr
    src, dst = _kind(have), _kind(want)

    def refuse(why: str, hint: str) -> DtypeMismatchError:
        expects = "text (STRING)" if want == np.dtype(object) else str(want)
        return DtypeMismatchError(f"input {name!r}: {where} has {have} data, the model expects {expects}; {why}",
                                  hint=hint)

    if want == np.dtype(object) and have.kind in "US":  # a string input: NumPy's str/bytes arrays, which
        # .npz stores without pickling; ONNX Runtime takes str objects (bytes read as UTF-8)
        try:
            return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v),
                                otypes=[object])(arr) if arr.size else arr.astype(object)
        except UnicodeDecodeError as err:
            raise refuse(f"its bytes are not UTF-8 text ({err.reason})", "save the strings as str, not bytes") from None
    if src == "other" or dst == "other":
        text = want == np.dtype(object)  # a string input (ONNX STRING): the data must be text
        raise refuse("quantkit converts only numeric and bool data" + (" and text" if text else ""),
                     "save the strings as a NumPy str array (np.array(['a', 'b']): .npz keeps it without pickling)"
                     if text else f"save the array as {want}")
    if arr.size == 0:
        return arr.astype(want)
    if dst == "float":
        if src == "float":
            with np.errstate(over="ignore"):
                out = arr.astype(want)
            if not np.isfinite(out).all() and np.isfinite(arr).all():
                raise refuse(f"values up to {float(np.abs(arr).max()):.4g} overflow {want}",
                             f"scale the data into {want}'s range")
            # once a process for the input: each pass (calibration, evaluation, compare) reads the data
            # again, and an image folder's every file is a new place (the float32 is the preprocessing's)
            said = (name, str(have), str(want))
            if have.itemsize > want.itemsize and noted is not None and name not in noted and said not in _SAID:
                noted.add(name)
                _SAID.add(said)
                log.warning("input %r: %s data cast to %s, as the model declares (first seen in %s)", name,
                            have, want, where)
            return out
        limit = _EXACT_INT_IN_FLOAT[want] if want in _EXACT_INT_IN_FLOAT else 2**24
        if src == "int" and np.abs(arr.astype(np.float64)).max() > limit:
            raise refuse(f"integers beyond {limit} are not exact in {want}", f"save the array as {want}")
        said = (name, str(have), str(want))
        if src == "int" and noted is not None and name not in noted and said not in _SAID:
            noted.add(name)
            _SAID.add(said)  # 0-255 pixels into a model that expects 0-1 (a forgotten /255) calibrate without error
            log.warning("input %r: %s data (values %s..%s) fed as %s values as they are (first seen in %s); "
                        "scale it first if the model expects another range (pixels / 255)", name, have,
                        arr.min(), arr.max(), want, where)
        return arr.astype(want)
    if dst == "bool":
        if not np.isin(arr, (0, 1)).all():
            raise refuse("values other than 0 and 1 are not booleans", "save the mask as bool or 0/1")
        return arr.astype(want)
    # integer input
    if src == "bool":
        return arr.astype(want)
    info = np.iinfo(want)
    if src == "float":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))].ravel()[0]
            raise refuse(f"values such as {float(bad)!r} are not whole numbers",
                         f"save the array with integer values as {want} (token ids, indices)")
    lo, hi = arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise refuse(f"values {lo}..{hi} do not fit {want}", f"save the array as {want}")
    return arr.astype(want)
