#!/usr/bin/env python3
"""The PyTorch side of `sparsegrad bench train`: the same model, shapes and methods on the same
machine (CPU). Prints one JSON line per method, run each in its own process for peak RSS.
Encoders (BERT) train a 2-label head; causal LMs (LLaMA: `architectures` ending in
`ForCausalLM`) next-token loss on every position, LoRA r 8 on gate/up/down as ours.

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers
    .venv-ref/bin/python scripts/bench_torch.py --model ~/.cache/sparsegrad/fixtures/models/all-minilm-l6-v2
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn


class LoraLinear(nn.Module):
    """LoRA as PEFT does it: frozen base, A kaiming-uniform, B zeros, scale alpha/r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def is_causal(path):
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    return any(x.endswith("ForCausalLM") for x in cfg.get("architectures") or [])


def run_one(a):
    torch.manual_seed(0)
    causal = is_causal(a.model)
    if causal:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    else:
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(a.model, num_labels=2, attn_implementation=a.attn)
        model.config.hidden_dropout_prob = 0.0
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if a.method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        if causal:
            for layer in model.model.layers:
                for name in ["gate_proj", "up_proj", "down_proj"]:
                    setattr(layer.mlp, name, LoraLinear(getattr(layer.mlp, name), 8, 16.0))
        else:
            for layer in model.bert.encoder.layer:
                layer.intermediate.dense = LoraLinear(layer.intermediate.dense, 8, 16.0)
                layer.output.dense = LoraLinear(layer.output.dense, 8, 16.0)
            for p in model.classifier.parameters():
                p.requires_grad_(True)
            for p in model.bert.pooler.parameters():
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(vocab, 1000) // 2, min(vocab, 30000), (a.batch_size, a.seq_len))
    labels = ids.clone() if causal else torch.arange(a.batch_size) % 2
    times, fw, bw, op = [], 0.0, 0.0, 0.0
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= a.warmup:
            times.append(t3 - t0)
            fw += t1 - t0
            bw += t2 - t1
            op += t3 - t2
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} ({a.attn} attention, CPU)",
        "task": "causal-lm" if causal else "classification",
        "method": a.method, "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps,
        "step_ms_mean": sum(times) / len(times) * 1e3, "step_ms_median": med * 1e3,
        "forward_ms": fw / a.steps * 1e3, "backward_ms": bw / a.steps * 1e3, "optimizer_ms": op / a.steps * 1e3,
        "tokens_per_sec": a.batch_size * a.seq_len / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="all")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default="eager")
    a = ap.parse_args()
    if a.method == "all":
        for m in ["full", "lora"]:
            subprocess.run([sys.executable, __file__, "--model", a.model, "--method", m,
                            "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
                            "--steps", str(a.steps), "--warmup", str(a.warmup), "--attn", a.attn], check=True)
    else:
        run_one(a)


if __name__ == "__main__":
    main()
