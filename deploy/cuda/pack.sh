#!/usr/bin/env bash
# Puts what the GPU check needs into target/gpu-carry/ (ignored by git; pass it as `carry`):
# the CUDA binary gzipped, and the MiniLM-L6 fixture with its weights in f16, gzipped (the
# check loads the same file on both devices, so the rounding does not affect the comparison)
# — together under the 64 MiB a device run can carry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
carry=target/gpu-carry
rm -rf "$carry" && mkdir -p "$carry/all-minilm-l6-v2"
cp target/cuda/sparsegrad.gz "$carry/sparsegrad.gz"
src=$(cargo run -q --bin sparsegrad -- fixtures | python3 -c 'import json,sys; print(json.load(sys.stdin)["minilm"])')
cp "$src"/config.json "$src"/tokenizer*.json "$carry/all-minilm-l6-v2/" 2>/dev/null || true
cp "$src"/*.txt "$carry/all-minilm-l6-v2/" 2>/dev/null || true
python3 - "$src/model.safetensors" "$carry/all-minilm-l6-v2/model.safetensors" <<'PY'
import json, struct, sys, array
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
out, meta, off = bytearray(), {}, 0
for name, t in header.items():
    if name == "__metadata__":
        meta[name] = t
        continue
    a, b = t["data_offsets"]
    raw = data[a:b]
    if t["dtype"] == "F32":
        vals = array.array("f"); vals.frombytes(raw)
        raw = struct.pack(f"<{len(vals)}e", *vals)
        t = dict(t, dtype="F16")
    meta[name] = dict(t, data_offsets=[off, off + len(raw)])
    out += raw; off += len(raw)
h = json.dumps(meta).encode(); h += b" " * (-len(h) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h); f.write(out)
PY
gzip -9 "$carry/all-minilm-l6-v2/model.safetensors"
du -sh "$carry"/* "$carry"/all-minilm-l6-v2/* "$carry"
