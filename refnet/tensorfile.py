"""Tensor files: safetensors, written and read with the standard library.

A safetensors file is an unsigned 64-bit little-endian header length n, n bytes of JSON
``{name: {"dtype": "F32"|"F64"|"BF16"|"F16"|"I64"|"BOOL", "shape": [...], "data_offsets": [begin,
end]}, ...}``, then the raw little-endian, C-order data; offsets count from the first byte after
the header.  The tests check this codec against the `safetensors` package both ways.

bfloat16 and float16 travel as their 16 raw bits (NumPy has no bfloat16: the bytes are moved
through an int16 view), so a round trip is exact, NaN payloads and -0 included.  BOOL is one
byte per element, 0 or 1.
"""
import json
import math
import struct

import torch

ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16",
             torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}
_ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
_ST_SIZE = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I64": 8, "BOOL": 1}
_RAW_16 = (torch.bfloat16, torch.float16)     # moved as their int16 bits (NumPy lacks bfloat16)
_MAX_HEADER = 100 * 1024 * 1024


def encode_safetensors(tensors, metadata=None):
    """tensors: ordered {name: tensor} (a dtype of ST_DTYPES, any device) -> the file's bytes."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in ST_DTYPES:
            raise TypeError(f"tensors[{name!r}]: expected a float32, float64, bfloat16, float16, "
                            f"int64 or bool tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.detach().cpu().contiguous()
        a = (t.view(torch.int16) if t.dtype in _RAW_16 else t).numpy()
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad to 8 bytes so data is aligned (the format allows spaces)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def decode_safetensors(blob, where="file"):
    """bytes -> ({name: tensor} in file order, metadata).  Errors: ValueError naming `where`."""
    if len(blob) < 8:
        raise ValueError(f"{where}: truncated (only {len(blob)} bytes; no safetensors header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"{where}: truncated or not safetensors (header length {n}, file "
                         f"{len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: corrupted safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + n:]
    out = []
    for name, info in header.items():
        try:
            dt, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: tensor {name!r}: header entry needs dtype, shape and "
                             f"data_offsets") from None
        if dt not in _ST_TORCH:
            raise ValueError(f"{where}: tensor {name!r}: dtype {dt!r} not supported; expected one "
                             f"of {', '.join(_ST_TORCH)}")
        numel = math.prod(shape)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)) \
                or end - begin != numel * _ST_SIZE[dt]:
            raise ValueError(f"{where}: tensor {name!r}: data_offsets {[begin, end]} do not fit "
                             f"shape {shape} {dt} in {len(data)} data bytes (truncated?)")
        out.append((begin, name, dt, shape))
    tensors = {}
    for begin, name, dt, shape in sorted(out):
        end = begin + math.prod(shape) * _ST_SIZE[dt]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=_ST_TORCH[dt]) if end > begin \
            else torch.empty(0, dtype=_ST_TORCH[dt])
        if dt == "BOOL" and not bool(((t.view(torch.uint8) == 0) | (t.view(torch.uint8) == 1)).all()):
            raise ValueError(f"{where}: tensor {name!r}: BOOL data holds a byte other than 0 or 1")
        tensors[name] = t.reshape(shape)
    return tensors, metadata
