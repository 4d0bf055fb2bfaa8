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
            if size < 8:
                raise SafetensorsError(f"{self.path} is truncated or empty ({size} bytes; no header)")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8:
                raise SafetensorsError(
                    f"{self.path} is truncated: header of {header_len} bytes but the file has {size}")
            try:
                header = json.loads(self._file.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path} has a malformed header: {e}") from e
            if not isinstance(header, dict):
                raise SafetensorsError(f"{self.path} has a malformed header (not a JSON object)")
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_len
            data_len = size - self._data_start
            self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
            for name, entry in header.items():
                try:
                    dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                except (KeyError, TypeError, ValueError) as e:
                    raise SafetensorsError(f"{self.path}: malformed header entry for tensor {name!r}") from e
                if end > data_len or begin > end:
                    raise SafetensorsError(
                        f"{self.path} is truncated: tensor {name!r} needs bytes {begin}..{end} of the data "
                        f"section, which has {data_len}")
                if dtype in _DTYPES and (end - begin) != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
                    raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes, which does "
                                           f"not match shape {list(shape)} of {dtype}")
                self._entries[name] = (dtype, shape, begin, end)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
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
        start = self._data_start + begin
        return np.frombuffer(self._map, dtype=_DTYPES[dtype], count=(end - begin) // _DTYPES[dtype].itemsize,
                             offset=start).reshape(shape).copy()

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
