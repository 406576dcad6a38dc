"""The compact checkpoint: one file holding an integer program.

Layout: ``b"PDEQINT1"``, a little-endian uint32 header length, a UTF-8 JSON
header (the program with every array replaced by a reference), then the raw
bytes of the arrays.  Weight codes of ``b`` bits are packed in two's
complement into containers of 2 (``b = 2``: four codes per byte), 4
(``b = 3, 4``: two per byte) or 8 bits; wider codes (the stem's) are stored
as int16/int32.  Requantization constants are int32 (int64 in the stem), the input steps and the float
head float32.  Loading needs numpy only (no training state, no model code).
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any, Dict, Tuple

import numpy as np

MAGIC = b"PDEQINT1"


def container_bits(bits: int) -> int:
  """Bits per stored code: 2, 4, 8 (or 16 / 32 for wider codes)."""
  if not 2 <= bits <= 32:
    raise ValueError(f"bits must lie in [2, 32], got {bits}")
  return next(c for c in (2, 4, 8, 16, 32) if bits <= c)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """Signed codes (``|code| < 2^(bits-1)``) packed ``8 / container`` a byte."""
  codes = np.asarray(codes)
  limit = 2 ** (bits - 1)
  if codes.size and (codes.min() < -limit or codes.max() >= limit):
    raise ValueError(f"codes in [{codes.min()}, {codes.max()}] do not fit "
                     f"{bits} signed bits")
  width = container_bits(bits)
  flat = codes.astype(np.int64).ravel()
  if width >= 16:
    return flat.astype(f"<i{width // 8}").tobytes()
  u = (flat & (2 ** width - 1)).astype(np.uint8)
  per = 8 // width
  u = np.concatenate([u, np.zeros((-u.size) % per, np.uint8)])
  u = u.reshape(-1, per)
  out = np.zeros(u.shape[0], np.uint8)
  for k in range(per):
    out |= (u[:, k] << (k * width)).astype(np.uint8)
  return out.tobytes()


def unpack_codes(data: bytes, bits: int, shape: Tuple[int, ...],
                 dtype=np.int8) -> np.ndarray:
  """Inverse of :func:`pack_codes`."""
  width = container_bits(bits)
  n = int(np.prod(shape))
  if width >= 16:
    return np.frombuffer(data, f"<i{width // 8}", n).astype(dtype).reshape(
        shape)
  raw = np.frombuffer(data, np.uint8)
  per = 8 // width
  u = np.stack([(raw >> (k * width)) & (2 ** width - 1) for k in range(per)],
               axis=1).ravel()[:n].astype(np.int16)
  u = np.where(u >= 2 ** (width - 1), u - 2 ** width, u)
  return u.astype(dtype).reshape(shape)


def _encode(obj, blobs, weight_bits=None):
  if isinstance(obj, dict):
    return {k: _encode(v, blobs) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_encode(v, blobs) for v in obj]
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if isinstance(obj, np.ndarray):
    arr = np.asarray(obj)
    if arr.dtype == np.float64:
      arr = arr.astype(np.float32)
    ref = {"__array__": len(blobs), "dtype": arr.dtype.str,
           "shape": list(arr.shape)}
    if weight_bits is not None:
      ref["bits"] = weight_bits
      blobs.append(pack_codes(arr, weight_bits))
    else:
      blobs.append(arr.tobytes())
    return ref
  return obj


def save(program: Dict[str, Any], path) -> int:
  """Writes the compact checkpoint; returns its size in bytes."""
  blobs = []
  header = {k: v for k, v in program.items() if k != "weights"}
  header = _encode(header, blobs)
  header["weights"] = {
      name: _encode(codes, blobs, program["weight_meta"][name]["bits"])
      for name, codes in program["weights"].items()}
  offsets, pos = [], 0
  for blob in blobs:
    offsets.append([pos, len(blob)])
    pos += len(blob)
  header["__blobs__"] = offsets
  text = json.dumps(header, separators=(",", ":")).encode()
  path = pathlib.Path(path)
  with open(path, "wb") as f:
    f.write(MAGIC + struct.pack("<I", len(text)) + text)
    for blob in blobs:
      f.write(blob)
  return path.stat().st_size


def _decode(obj, data, offsets):
  if isinstance(obj, dict):
    if "__array__" in obj:
      start, size = offsets[obj["__array__"]]
      raw = data[start:start + size]
      shape = tuple(obj["shape"])
      if "bits" in obj:
        return unpack_codes(raw, obj["bits"], shape, np.dtype(obj["dtype"]))
      return np.frombuffer(raw, np.dtype(obj["dtype"])).reshape(shape).copy()
    return {k: _decode(v, data, offsets) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, data, offsets) for v in obj]
  return obj


def load(path) -> Dict[str, Any]:
  """The program stored by :func:`save`."""
  raw = pathlib.Path(path).read_bytes()
  if raw[:8] != MAGIC:
    raise ValueError(f"{path} is not a pdeq_jax compact checkpoint (magic "
                     f"{raw[:8]!r}, expected {MAGIC!r})")
  (length,) = struct.unpack("<I", raw[8:12])
  header = json.loads(raw[12:12 + length])
  offsets = header.pop("__blobs__")
  return _decode(header, raw[12 + length:], offsets)


def float_checkpoint_bytes(variables) -> int:
  """Bytes of the float32 variables (params + batch statistics)."""
  import jax  # pylint: disable=import-outside-toplevel
  return sum(4 * int(np.prod(np.shape(leaf)))
             for leaf in jax.tree_util.tree_leaves(variables))
