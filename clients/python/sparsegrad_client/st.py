"""The safetensors format, read and written with numpy alone (bf16 included, which numpy has
no type for: it is widened to float32 on read and rounded to nearest-even on write).

Format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes.
"""

import json
import os
import struct

import numpy as np

_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
_NAME = {np.dtype(v): k for k, v in _NP.items()}
# Bounds on what a header may claim, so a hostile file cannot make the reader allocate freely.
MAX_HEADER = 100 << 20


class Tensors(dict):
    """name → numpy array, with `.metadata` (the header's string map) and `.dtypes` (each
    tensor's stored dtype name, so a bf16 weight can be written back as bf16)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.metadata = {}
        self.dtypes = {}


def read(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header of {n} bytes does not fit the file")
        header = json.loads(f.read(n))
        data = f.read()
    out = Tensors()
    out.metadata = dict(header.pop("__metadata__", None) or {})
    for name, h in header.items():
        begin, end = h["data_offsets"]
        shape = tuple(int(d) for d in h["shape"])
        dtype = h["dtype"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: `{name}` lies outside the file")
        raw = data[begin:end]
        if dtype == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dtype in _NP:
            arr = np.frombuffer(raw, dtype=np.dtype(_NP[dtype]).newbyteorder("<")).astype(_NP[dtype])
        else:
            raise ValueError(f"{path}: `{name}` has dtype {dtype}, which this reader does not know")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: `{name}` holds {arr.size} values for shape {shape}")
        out[name] = arr.reshape(shape)
        out.dtypes[name] = dtype
    return out


def _bf16_bytes(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # Round to nearest even; NaNs stay NaNs.
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a.astype(np.float32))
    rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.astype("<u2").tobytes()


def write(path, tensors, metadata=None, dtypes=None):
    """Writes `tensors` (name → array) sorted by name, through a temporary file and a rename;
    `dtypes` may name `BF16` for float arrays to be stored as bfloat16."""
    dtypes = dtypes or {}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        want = dtypes.get(name)
        if want == "BF16":
            b, dt = _bf16_bytes(a), "BF16"
        else:
            if want is not None:
                a = a.astype(_NP[want])
            dt = _NAME.get(a.dtype)
            if dt is None:
                raise ValueError(f"`{name}`: dtype {a.dtype} has no safetensors name")
            b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
