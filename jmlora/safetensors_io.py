"""Reading safetensors files tensor by tensor into numpy, bfloat16 included.

We deliberately read the (tiny, documented) safetensors layout ourselves instead of going through
``safetensors.safe_open(framework="numpy")``: that backend raises ``TypeError: data type 'bfloat16' not
understood`` (numpy has no bfloat16), and most checkpoints are bfloat16. ``ml_dtypes`` supplies the numpy
dtype. Files are memory-mapped, so reading one tensor costs one tensor of host memory, and every
structural problem (truncated file, bad header, offsets outside the file) is an error naming the file.
Writing (small test/demo checkpoints) goes through the ``safetensors`` library.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: truncated, malformed, or missing a tensor."""


_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(path: Path, f, size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Reads and checks a safetensors header: ``{name: (dtype tag, shape, begin, end)}``, absolute offsets."""
    if size == 0:
        raise SafetensorsError(f"{path} is empty")
    if size < 8:
        raise SafetensorsError(f"{path} is truncated ({size} bytes, shorter than the 8-byte header length)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise SafetensorsError(f"{path} is truncated or not a safetensors file (header length {header_len}, "
                               f"file size {size} bytes)")
    try:
        header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path} is not a safetensors file (its header is not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not (isinstance(dtype, str) and all(_is_int(d) and d >= 0 for d in shape)
                    and _is_int(begin) and _is_int(end) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: header entry for tensor {name!r} is malformed: {entry!r}") from None
        if dtype in _DTYPES:
            nbytes = int(np.prod(shape)) * _DTYPES[dtype].itemsize
            if end - begin != nbytes:
                raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes of data but its shape "
                                       f"{list(shape)} and dtype {dtype} need {nbytes}")
        if data_start + end > size:
            raise SafetensorsError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, "
                                   f"the file has {size}")
        entries[name] = (dtype, shape, data_start + begin, data_start + end)
    return entries


class SafetensorsFile:
    """A memory-mapped safetensors file.

    Usage::

        with SafetensorsFile(path) as f:
            for name in f.keys():
                array = f.get(name)      # numpy array (a copy, independent of the mapping)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file {self.path} does not exist")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        size = self.path.stat().st_size
        try:
            self._entries = _parse_header(self.path, self._file, size)   # absolute byte offsets
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype tag of a tensor, e.g. "BF16"."""
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def get(self, name: str) -> np.ndarray:
        """Returns a tensor as a fresh numpy array (safe to keep after the file is closed)."""
        dtype, shape, begin, end = self._entry(name)
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        return np.frombuffer(self._map, dtype=_DTYPES[dtype], count=(end - begin) // _DTYPES[dtype].itemsize,
                             offset=begin).reshape(shape).copy()

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path} has no tensor {name!r}") from None

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
