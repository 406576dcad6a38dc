"""The compact checkpoint: one file holding an integer program.

Layout: ``b"PDEQINT2"``, a little-endian uint32 header length, the
zlib-compressed UTF-8 JSON header (the program with every array replaced by
a reference), then the bytes of the arrays, one after the other, as one
zlib stream (``save(..., deflate=False)``: raw).  Weight codes of ``b`` bits
are packed in two's complement into containers of 2 (``b = 2``: four codes
per byte), 4 (``b = 3, 4``: two per byte) or 8 bits; wider codes (the
stem's 22-bit ones) take 16, 24 or 32 bits.  Other integer arrays (the
requantization constants) are stored losslessly in the fewest bytes:

* an array of one repeated value (an identity shortcut's multiplier, the
  zero bias of Eq. 20's copied channels): that value, in the header;
* values that fit int8 / int16 / int32: that type;
* int64 values ``mant 2^e`` with an int32 ``mant`` (every wide multiplier
  and bias, see ``program.MANTISSA_BITS``): the int32 mantissas plus one
  uint8 exponent per value (one in the header if they are all equal);
* otherwise int64.

Float arrays (the input steps, the float head) are float32.  Loading needs
numpy and the standard library only (no training state, no model code) and
restores every array bit for bit; ``PDEQINT1`` files (uncompressed header,
raw int64 constants) still load.
"""

from __future__ import annotations

import json
import pathlib
import struct
import zlib
from typing import Any, Dict, Tuple

import numpy as np

MAGIC = b"PDEQINT2"
MAGIC_V1 = b"PDEQINT1"  # uncompressed header; still loads


def container_bits(bits: int) -> int:
  """Bits per stored code: 2, 4, 8 (or 16 / 24 / 32 for wider codes)."""
  if not 2 <= bits <= 32:
    raise ValueError(f"bits must lie in [2, 32], got {bits}")
  return next(c for c in (2, 4, 8, 16, 24, 32) if bits <= c)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """Signed codes (``|code| < 2^(bits-1)``) packed ``8 / container`` a byte."""
  codes = np.asarray(codes)
  limit = 2 ** (bits - 1)
  if codes.size and (codes.min() < -limit or codes.max() >= limit):
    raise ValueError(f"codes in [{codes.min()}, {codes.max()}] do not fit "
                     f"{bits} signed bits")
  width = container_bits(bits)
  flat = codes.astype(np.int64).ravel()
  if width == 24:  # the low three bytes of little-endian int32
    return flat.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
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
  if width == 24:
    b3 = np.frombuffer(data, np.uint8, 3 * n).reshape(n, 3).astype(np.int64)
    u = b3[:, 0] | (b3[:, 1] << 8) | (b3[:, 2] << 16)
    return np.where(u >= 2 ** 23, u - 2 ** 24, u).astype(dtype).reshape(shape)
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
    elif arr.dtype.kind in "iu" and arr.size:
      ref.update(_encode_int(arr, blobs))
    else:
      blobs.append(arr.tobytes())
    return ref
  return obj


def _split_pow2(flat: np.ndarray):
  """``flat = mant << e`` with int32 ``mant`` (``e`` per value), or None."""
  e = np.zeros(flat.shape, np.int64)
  mant = flat.copy()
  for _ in range(63):
    even = (mant != 0) & (mant % 2 == 0) & ((mant < -2 ** 31) |
                                            (mant >= 2 ** 31))
    if not even.any():
      break
    mant = np.where(even, mant // 2, mant)
    e += even
  if np.any((mant < -2 ** 31) | (mant >= 2 ** 31)):
    return None
  return mant.astype("<i4"), e.astype(np.uint8)


def _encode_int(arr: np.ndarray, blobs) -> Dict[str, Any]:
  """The smallest lossless form of an integer array (see the module doc)."""
  flat = arr.astype(np.int64).ravel()
  if np.all(flat == flat[0]):
    blobs.append(b"")
    return {"const": int(flat[0])}
  for t in ("<i1", "<i2", "<i4"):
    info = np.iinfo(t)
    if flat.min() >= info.min and flat.max() <= info.max:
      blobs.append(flat.astype(t).tobytes())
      return {"store": t}
  split = _split_pow2(flat)
  if split is None:
    blobs.append(flat.astype("<i8").tobytes())
    return {"store": "<i8"}
  mant, e = split
  if np.all(e == e[0]):
    blobs.append(mant.tobytes())
    return {"store": "mant", "exp": int(e[0])}
  blobs.append(mant.tobytes() + e.tobytes())
  return {"store": "mant"}


def _decode_int(ref: Dict[str, Any], raw: bytes) -> np.ndarray:
  shape, dtype = tuple(ref["shape"]), np.dtype(ref["dtype"])
  n = int(np.prod(shape))
  if "const" in ref:
    return np.full(shape, ref["const"], dtype)
  if ref["store"] != "mant":
    return np.frombuffer(raw, ref["store"], n).astype(dtype).reshape(shape)
  mant = np.frombuffer(raw, "<i4", n).astype(np.int64)
  e = (np.int64(ref["exp"]) if "exp" in ref else
       np.frombuffer(raw, np.uint8, n, 4 * n).astype(np.int64))
  return np.left_shift(mant, e).astype(dtype).reshape(shape)


def serialize(program: Dict[str, Any], deflate: bool = True) -> bytes:
  """The compact checkpoint's bytes (what :func:`save` writes).

  ``deflate``: the packed arrays are also zlib-compressed as one stream (an
  entropy code: 4-bit weight codes concentrate near 0, ~3.4 bits of entropy
  each); ``False`` keeps them as raw packed bytes that can be read in place.
  """
  blobs = []
  header = {k: v for k, v in program.items() if k != "weights"}
  header = _encode(header, blobs)
  header["weights"] = {
      name: _encode(codes, blobs, program["weight_meta"][name]["bits"])
      for name, codes in program["weights"].items()}
  header["__sizes__"] = [len(blob) for blob in blobs]
  header["__deflate__"] = bool(deflate)
  text = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
  body = b"".join(blobs)
  return (MAGIC + struct.pack("<I", len(text)) + text
          + (zlib.compress(body, 9) if deflate else body))


def save(program: Dict[str, Any], path, deflate: bool = True) -> int:
  """Writes the compact checkpoint (:func:`serialize`); returns its size in
  bytes."""
  path = pathlib.Path(path)
  path.write_bytes(serialize(program, deflate))
  return path.stat().st_size


def _decode(obj, data, offsets):
  if isinstance(obj, dict):
    if "__array__" in obj:
      start, size = offsets[obj["__array__"]]
      raw = data[start:start + size]
      shape = tuple(obj["shape"])
      if "bits" in obj:
        return unpack_codes(raw, obj["bits"], shape, np.dtype(obj["dtype"]))
      if "const" in obj or "store" in obj:
        return _decode_int(obj, raw)
      return np.frombuffer(raw, np.dtype(obj["dtype"])).reshape(shape).copy()
    return {k: _decode(v, data, offsets) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, data, offsets) for v in obj]
  return obj


def load(path) -> Dict[str, Any]:
  """The program stored by :func:`save`."""
  raw = pathlib.Path(path).read_bytes()
  if raw[:8] not in (MAGIC, MAGIC_V1):
    raise ValueError(f"{path} is not a pdeq_jax compact checkpoint (magic "
                     f"{raw[:8]!r}, expected {MAGIC!r})")
  (length,) = struct.unpack("<I", raw[8:12])
  text = raw[12:12 + length]
  body = raw[12 + length:]
  if raw[:8] == MAGIC_V1:
    header = json.loads(text)
    return _decode(header, body, header.pop("__blobs__"))
  header = json.loads(zlib.decompress(text))
  if header.pop("__deflate__"):
    body = zlib.decompress(body)
  offsets, pos = [], 0
  for size in header.pop("__sizes__"):
    offsets.append([pos, size])
    pos += size
  return _decode(header, body, offsets)


def float_checkpoint_bytes(variables) -> int:
  """Bytes of the float32 variables (params + batch statistics)."""
  import jax  # pylint: disable=import-outside-toplevel
  return sum(4 * int(np.prod(np.shape(leaf)))
             for leaf in jax.tree_util.tree_leaves(variables))
