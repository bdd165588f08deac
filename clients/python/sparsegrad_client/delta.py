"""Applies a sparsegrad-service delta (`delta.safetensors`, its descriptor in the file's
metadata) to a Hugging Face model folder with numpy alone, writing a folder `transformers`
loads without this service — the same result as the service's merge.

Entries (the descriptor's `entries`, by tensor name):
- `dense` {param}: the tensor replaces the parameter (trained dense weights, a new head);
- `lora` {linear, scale}: `W += scale · B · A` on `{linear}.weight`;
- `sparse` {param, basis?}: `S` from `{param}.sparse_indices` (2 × k: row, column) and
  `{param}.sparse_values`; with a basis (SparseGrad) `W += P S Qᵀ`, `P`, `Q` the basis tensors
  of that MLP kind (stored compact: only the columns the supports use, with a `.columns`
  map); without one (MeProp) `W += S`;
- `add` {param}: the tensor is added to the parameter;
- `basis`: read through the sparse entries.
Additions are summed in float32 and rounded to the base dtype once, as the service does.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from . import st

FORMAT = "sparsegrad-delta"
FORMAT_VERSION = 2

# Per architecture: the checkpoint prefix, the names that sit under it when a checkpoint
# leaves it out, the head's own names, and the class a merged classifier declares.
ARCHS = {
    "bert": ("bert", ("embeddings.", "encoder.", "pooler."), ("classifier.",), "BertForSequenceClassification"),
    "roberta": ("roberta", ("embeddings.", "encoder.", "pooler."), ("classifier.",), "RobertaForSequenceClassification"),
    "llama": ("model", ("embed_tokens.", "layers.", "norm."), ("lm_head",), "LlamaForCausalLM"),
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "vocab.json", "chat_template.jinja", "generation_config.json",
)


class DeltaError(ValueError):
    pass


def canonical(arch, name):
    """A checkpoint tensor's name as the service names it (None: not a model parameter)."""
    prefix, bare, own, _ = ARCHS[arch]
    n = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if n.endswith("position_ids") or n.endswith("rotary_emb.inv_freq"):
        return None
    if n.startswith(prefix + ".") or any(n.startswith(o) for o in own):
        return n
    if any(n.startswith(b) for b in bare):
        return f"{prefix}.{n}"
    return None


def weight_files(model_dir):
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(model_dir, v) for v in json.load(f)["weight_map"].values()})
        return files
    raise DeltaError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def sha256_files(files):
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_delta(path):
    """(descriptor, tensors) of a delta file (or a folder holding `delta.safetensors`)."""
    if os.path.isdir(path):
        path = os.path.join(path, "delta.safetensors")
    t = st.read(path)
    md = t.metadata
    if md.get("format") != FORMAT:
        raise DeltaError(f"{path} is not a {FORMAT} file")
    version = int(md.get("format_version", "0") or 0)
    if not 1 <= version <= FORMAT_VERSION:
        raise DeltaError(f"unsupported format_version {version} (this client reads ≤ {FORMAT_VERSION})")
    return json.loads(md["descriptor"]), t


def _basis(tensors, name, n):
    """A basis tensor as the full n × n matrix (a compact one expanded by its column map)."""
    if name not in tensors:
        raise DeltaError(f"the delta lacks basis `{name}`")
    b = tensors[name].astype(np.float32)
    cols = tensors.get(name + ".columns")
    if cols is None:
        return b
    full = np.zeros((b.shape[0], n), dtype=np.float32)
    full[:, cols.astype(np.int64)] = b
    return full


def delta_weights(descriptor, tensors, base):
    """The parameters the delta changes: name → new float32 (or replaced) array, computed
    against `base` (name → array, canonical names)."""
    entries = descriptor["entries"]
    replaced, adds, lora = {}, {}, {}

    def add(param, d):
        adds[param] = adds[param] + d if param in adds else d

    for name, e in entries.items():
        kind = e["kind"]
        if kind in ("basis",) or name.endswith(".sparse_indices"):
            continue
        if name not in tensors:
            raise DeltaError(f"the descriptor names `{name}` but the file lacks it")
        t = tensors[name]
        if kind == "dense":
            p = e["param"]
            if p in base and base[p].shape != t.shape:
                raise DeltaError(f"`{p}` has shape {t.shape} in the delta but {base[p].shape} in the base")
            replaced[p] = t
        elif kind == "add":
            add(e["param"], t.astype(np.float32))
        elif kind == "lora":
            ab = lora.setdefault(e["linear"], [None, None, float(e["scale"])])
            ab[0 if name.endswith("lora_A.weight") else 1] = t.astype(np.float32)
        elif kind == "sparse":
            p = e["param"]
            if p not in base:
                raise DeltaError(f"the delta updates `{p}`, which the base model lacks")
            out, inp = base[p].shape
            rc = tensors[f"{p}.sparse_indices"].astype(np.int64)
            vals = t.astype(np.float32)
            if rc.shape != (2, vals.size):
                raise DeltaError(f"`{p}.sparse_indices` must be (2, {vals.size}), not {rc.shape}")
            r, c = rc
            if r.min(initial=0) < 0 or c.min(initial=0) < 0 or r.max(initial=0) >= out or c.max(initial=0) >= inp:
                raise DeltaError(f"`{p}` has an index outside its {out}×{inp} weight")
            s = np.zeros((out, inp), dtype=np.float32)
            np.add.at(s, (r, c), vals)
            basis = e.get("basis")
            if basis is None:
                add(p, s)
            else:
                pm = _basis(tensors, f"sparsegrad.basis.{basis}.P", out)
                qm = _basis(tensors, f"sparsegrad.basis.{basis}.Q", inp)
                if pm.shape != (out, out) or qm.shape != (inp, inp):
                    raise DeltaError(f"the {basis} basis does not fit a {out}×{inp} weight")
                add(p, pm @ s @ qm.T)
        else:
            raise DeltaError(f"`{name}`: unknown entry kind `{kind}`")
    changed = dict(replaced)
    for linear, (a, b, scale) in lora.items():
        if a is None or b is None:
            raise DeltaError(f"the LoRA pair for `{linear}` is incomplete")
        w = f"{linear}.weight"
        d = (b @ a) * np.float32(scale)
        if d.shape != base[w].shape:
            raise DeltaError(f"the LoRA delta for `{linear}` does not fit its weight")
        changed[w] = base[w].astype(np.float32) + d
    for p, d in adds.items():
        if d.shape != base[p].shape:
            raise DeltaError(f"the delta for `{p}` has shape {d.shape} but the weight {base[p].shape}")
        changed[p] = changed.get(p, base[p]).astype(np.float32) + d
    return changed


def merged_config(config, descriptor):
    arch = descriptor["arch"]
    c = dict(config)
    _, _, _, class_name = ARCHS[arch]
    c["architectures"] = [class_name]
    if arch == "llama":
        return c
    task = descriptor["task"]
    kind = task.get("type") if isinstance(task, dict) else task
    if kind == "regression":
        c["num_labels"], c["problem_type"] = 1, "regression"
    else:
        c["num_labels"] = int(task.get("num_labels", 2)) if isinstance(task, dict) else 2
        c["problem_type"] = "single_label_classification"
    names = (descriptor.get("labels") or {}).get("names")
    if names:
        c["id2label"] = {str(i): n for i, n in enumerate(names)}
        c["label2id"] = {n: i for i, n in enumerate(names)}
    return c


def apply_delta(model_dir, delta_path, out_dir, check_base=True):
    """Writes base (`model_dir`) + delta as a model folder `out_dir`: `config.json`,
    `model.safetensors` (the base's dtypes), the tokenizer files. Refuses a delta trained on
    another base (sha256 of the weight files) unless `check_base` is false."""
    descriptor, tensors = read_delta(delta_path)
    arch = descriptor["arch"]
    if arch not in ARCHS:
        raise DeltaError(f"architecture `{arch}` is not one this client knows")
    files = weight_files(model_dir)
    if check_base:
        sha = sha256_files(files)
        if sha != descriptor["base_model_sha256"]:
            raise DeltaError(
                f"base model mismatch: the delta was trained on sha256 {descriptor['base_model_sha256']} "
                f"but {model_dir} has {sha}"
            )
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != arch:
        raise DeltaError(f"the delta is for {arch} but the base is {config.get('model_type')}")
    base, dtypes = {}, {}
    for path in files:
        t = st.read(path)
        for name, a in t.items():
            c = canonical(arch, name)
            if c is not None:
                base[c], dtypes[c] = a, t.dtypes[name]
    changed = delta_weights(descriptor, tensors, base)
    float_dtype = next((d for d in dtypes.values() if d in ("F32", "BF16", "F16", "F64")), "F32")
    out = dict(base)
    for name, a in changed.items():
        out[name] = a
        dtypes.setdefault(name, float_dtype)
    os.makedirs(out_dir, exist_ok=True)
    st.write(os.path.join(out_dir, "model.safetensors"), out, {"format": "pt"}, dtypes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(merged_config(config, descriptor), f, indent=2)
    for name in TOKENIZER_FILES:
        src = os.path.join(model_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="sparsegrad-apply",
        description="Apply a sparsegrad-service delta to a Hugging Face model folder.",
    )
    ap.add_argument("--model", required=True, help="the base model folder the job trained on")
    ap.add_argument("--delta", required=True, help="delta.safetensors (or its folder)")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--no-check-base", action="store_true", help="skip the base model's sha256 check")
    a = ap.parse_args(argv)
    try:
        apply_delta(a.model, a.delta, a.out, check_base=not a.no_check_base)
    except DeltaError as e:
        print(f"sparsegrad-apply: {e}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
