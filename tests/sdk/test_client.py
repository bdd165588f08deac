"""clients/python (sparsegrad_client) against a real server and worker (scripts/sdk-test.sh):
every method's delta — SparseGrad, LoRA, full, MeProp on MiniLM-L6 classification and
SparseGrad on a 4-layer SmolLM2 — downloaded (resumably, checksummed), applied to the base
model folder with numpy alone, and compared tensor by tensor with the service's own merge; the applied folder's predictions
(`sparsegrad predict` on it, no delta) equal the service's predictions for the job.

Environment: BASE_URL, ADMIN_KEY, FIXTURES, SPARSEGRAD_BIN (the binary the server runs).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

from sparsegrad_client import Client, DeltaError, ServiceError, apply_delta, st
from sparsegrad_client.delta import canonical, main as apply_main

BASE = os.environ["BASE_URL"]
ADMIN = os.environ["ADMIN_KEY"]
FIX = os.environ["FIXTURES"]
MINILM = "all-minilm-l6-v2"
SMOL = "smollm2-135m-instruct-4l"


def admin_key():
    c = Client(BASE, ADMIN)
    t = c._request("POST", "/v1/admin/tenants", {"name": "client"})
    return c._request("POST", "/v1/admin/api_keys", {"tenant_id": t["id"]})["key"]


def upload(client, path, n, name):
    with open(path, "rb") as f:
        data = b"".join(f.readlines()[:n])
    return client.openai.files.create(file=(name, data), purpose="fine-tune").id


def compare(mine_dir, theirs_dir, base_dir, label):
    mine = load_file(os.path.join(mine_dir, "model.safetensors"))  # our writer, read by safetensors
    theirs = load_file(os.path.join(theirs_dir, "model.safetensors"))
    # The delta changed something (else equal folders would prove nothing).
    arch = json.load(open(os.path.join(base_dir, "config.json")))["model_type"]
    base = {canonical(arch, k): v for k, v in load_file(os.path.join(base_dir, "model.safetensors")).items()}
    changed = [n for n, t in theirs.items() if n not in base or not np.array_equal(base[n], t)]
    assert changed, f"{label}: the merged model equals the base"
    missing = sorted(set(theirs) - set(mine))
    assert not missing, f"{label}: the client's folder lacks {missing[:5]}"
    worst = 0.0
    for name, t in theirs.items():
        m = mine[name]
        assert m.shape == t.shape and m.dtype == t.dtype, (label, name, m.shape, t.shape, m.dtype, t.dtype)
        if t.dtype.kind == "f":
            scale = max(1.0, float(np.abs(t).max(initial=0)))
            worst = max(worst, float(np.abs(m.astype(np.float64) - t).max(initial=0)) / scale)
        else:
            assert (m == t).all(), (label, name)
    assert worst <= 1e-5, f"{label}: max relative difference {worst}"
    with open(os.path.join(mine_dir, "config.json")) as f:
        mc = json.load(f)
    with open(os.path.join(theirs_dir, "config.json")) as f:
        tc = json.load(f)
    assert mc == tc, f"{label}: config.json differs: {mc} vs {tc}"
    for tok in ("tokenizer.json",):
        assert os.path.exists(os.path.join(mine_dir, tok)), tok
    return worst, len(changed)


def cli_predict(model_dir, inputs):
    """`sparsegrad predict` on a plain model folder (no artifact)."""
    path = os.path.join(model_dir, "inputs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(i) + "\n" for i in inputs)
    out = subprocess.run(
        [os.environ["SPARSEGRAD_BIN"], "predict", "--model", model_dir, "--inputs-file", path,
         "--max-new-tokens", "8"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def main():
    client = Client(BASE, admin_key())
    jsonl = lambda *p: os.path.join(FIX, "data", *p)
    train = upload(client, jsonl("rt_polarity", "train.jsonl"), 64, "train.jsonl")
    chat = upload(client, jsonl("chitchat", "train.jsonl"), 32, "chat.jsonl")
    quick = {"max_steps": 3, "batch_size": 8, "max_seq_len": 32}
    sparse_quick = dict(quick, head_warmup_steps=0, basis_steps=2)
    runs = [
        ("sparsegrad", MINILM, train, {"type": "sparsegrad", "hyperparameters": sparse_quick}),
        ("lora", MINILM, train, {"type": "lora", "hyperparameters": quick}),
        ("full", MINILM, train, {"type": "full", "hyperparameters": quick}),
        ("meprop", MINILM, train, {"type": "meprop", "hyperparameters": quick}),
        ("sparsegrad-llama", SMOL, chat, {"type": "sparsegrad", "hyperparameters": dict(sparse_quick, batch_size=4)}),
    ]
    jobs = [
        (label, model, client.openai.fine_tuning.jobs.create(model=model, training_file=f, method=m).id)
        for label, model, f, m in runs
    ]
    work = tempfile.mkdtemp()
    for i, (label, model, job_id) in enumerate(jobs):
        # The first with a progress bar (to a buffer), the rest plainly.
        out = open(os.devnull, "w")
        job = client.wait(job_id, progress=(i == 0), file=out, timeout=900)
        assert job.status == "succeeded", (label, job.status, job.error)
        folder = os.path.join(work, label)
        delta = client.download_delta(job_id, folder)
        base_dir = os.path.join(FIX, "models", model)
        mine = apply_delta(base_dir, delta, os.path.join(folder, "applied"))
        m = client.merge(job_id, poll=0.5, timeout=900)
        assert m["status"] == "succeeded", (label, m)
        theirs = os.path.join(folder, "merged")
        os.makedirs(theirs)
        for a in client.artifacts(job_id):
            if a["kind"] == "merged" and a["name"] in ("model.safetensors", "config.json"):
                client.download(a, os.path.join(theirs, a["name"]))
        worst = compare(mine, theirs, base_dir, label)
        # The applied folder predicts as the service predicts for the job (the folder run by
        # the service's own command line, without the delta).
        inputs = [{"prompt": "Hi! How are you today?"}] if model == SMOL else [
            {"text": "a gorgeous, witty film"}, {"text": "tedious and overlong"}]
        served = client.predict(job_id, inputs, max_new_tokens=8)
        local = cli_predict(mine, inputs)
        for s_, l_ in zip(served, local):
            if "completion" in s_:
                assert s_["completion"] == l_["completion"], (label, s_, l_)
            else:
                assert s_["label"] == l_["label"], (label, s_, l_)
                assert np.allclose(s_["probabilities"], l_["probabilities"], atol=1e-5), (label, s_, l_)
        print(f"{label}: applied == merged (max relative difference {worst[0]:.2e}; {worst[1]} tensors changed)")

    # Downloads resume from a partial file, and a corrupt one is refused, not kept.
    label, _, job_id = jobs[0]
    art = next(a for a in client.artifacts(job_id) if a["name"] == "delta.safetensors")
    dest = os.path.join(work, "resumed.safetensors")
    with open(os.path.join(work, label, "delta.safetensors"), "rb") as f:
        good = f.read()
    with open(dest + ".part", "wb") as f:
        f.write(good[:1000])
    client.download(art, dest)
    with open(dest, "rb") as f:
        assert f.read() == good
    bad = os.path.join(work, "bad.safetensors")
    with open(bad + ".part", "wb") as f:
        f.write(b"x" * 1000)
    try:
        client.download(art, bad)
    except ServiceError as e:
        assert e.code == "checksum_mismatch" and not os.path.exists(bad + ".part"), e
    else:
        raise AssertionError("a corrupt partial download was accepted")

    # The wrong base is refused (its sha256), by the function and the command alike.
    smol_delta = os.path.join(work, "sparsegrad-llama", "delta.safetensors")
    try:
        apply_delta(os.path.join(FIX, "models", "smollm2-135m-instruct"), smol_delta, os.path.join(work, "x"))
    except DeltaError as e:
        assert "base model mismatch" in str(e), e
    else:
        raise AssertionError("a delta was applied to another base")
    assert apply_main(["--model", os.path.join(FIX, "models", MINILM), "--delta", smol_delta, "--out", os.path.join(work, "y")]) == 2

    # bf16 round trip of the numpy-only safetensors writer, read back by safetensors itself.
    a = np.array([[1.0, -2.5, 3.14159, 1e-8]], dtype=np.float32)
    p = os.path.join(work, "bf16.safetensors")
    st.write(p, {"w": a}, {"format": "pt"}, {"w": "BF16"})
    back = st.read(p)
    assert back.dtypes["w"] == "BF16" and np.allclose(back["w"], a, rtol=1e-2), back["w"]

    print("sparsegrad_client: every delta applied equals the service's merge")


if __name__ == "__main__":
    try:
        main()
    except ServiceError as e:
        print(f"ServiceError {e}", file=sys.stderr)
        raise
