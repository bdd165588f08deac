#!/usr/bin/env python3
"""The PyTorch side of `sparsegrad bench compare --torch PYTHON`: one run with transformers
(+ peft for LoRA) on the same rows, with the service's default recipe — the model's dropout
on, AdamW with weight decay 0.01 on matrices only, linear decay after a warm-up over 6% of
the steps (rounded up), clipping at 1.0, batches padded to their longest row — then the dev
metric. Classification rows (`text`, `label`) report accuracy; causal-LM rows (`prompt` +
`completion`, encoded as the service does: the prompt with the tokenizer's special tokens,
the completion, EOS, the loss on the completion and EOS only) report the dev loss per target
token. Prints one JSON line.

    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers peft
    .venv-ref/bin/python scripts/compare_torch.py --model DIR --train FILE --valid FILE --method full --seed 0
"""
import argparse
import json
import math
import resource
import time

import torch


def read_rows(path, limit):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def auto_epochs(n):
    # The rule the service's `epochs: "auto"` follows (engine/src/train/config.rs).
    if n * 3 < 100:
        return min(25, 100 // n)
    if n * 3 > 25000:
        return max(1, 25000 // n)
    return 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", default="auto")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--lora-r", type=int, default=8)
    # As the service's LoRA scope: head (the head only) or mlp (plus the MLP biases and every
    # LayerNorm), both densely beside the adapters.
    ap.add_argument("--scope", choices=["head", "mlp"], default="mlp")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--limit-train", type=int)
    ap.add_argument("--limit-valid", type=int)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(a.seed)
    train = read_rows(a.train, a.limit_train)
    valid = read_rows(a.valid, a.limit_valid)
    causal = "prompt" in train[0]
    tok = AutoTokenizer.from_pretrained(a.model)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    else:
        labels = sorted({str(r["label"]) for r in train})
        index = {l: i for i, l in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=len(labels),
                                                                   dtype=torch.float32)
    if a.method == "lora":
        import re

        from peft import LoraConfig, get_peft_model

        if causal:
            cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                             target_modules=r".*layers\.\d+\.mlp\.(gate|up|down)_proj")
        else:
            cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                             target_modules=r".*layer\.\d+\.(intermediate|output)\.dense",
                             modules_to_save=["classifier", "pooler"])
        model = get_peft_model(model, cfg)
        if a.scope == "mlp":
            extra = re.compile(r"(norm\.(weight|bias)|layer\.\d+\.(intermediate|output)\.dense(\.base_layer)?\.bias)$",
                               re.IGNORECASE)
            for n, p in model.named_parameters():
                if extra.search(n):
                    p.requires_grad_(True)
        lr = a.lr or 5e-4
    else:
        lr = a.lr or 5e-5
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.ndim >= 2 and not n.endswith(".bias")
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": 0.01},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
    ], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    epochs = auto_epochs(len(train)) if a.epochs == "auto" else int(a.epochs)
    per_epoch = math.ceil(len(train) / a.batch_size)
    total = a.max_steps or per_epoch * epochs
    warmup = math.ceil(0.06 * total)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))

    def encode(rows):
        return tok([r["text"] for r in rows], padding=True, truncation=True, max_length=a.max_seq_len,
                   return_tensors="pt")

    def encode_lm(rows):
        # As engine/src/data/encode.rs: prompt (special tokens on), completion, EOS; targets
        # the completion and EOS, never position 0; right-padded to the longest row.
        seqs = []
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=True)["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"]
            ids = p + c + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            mask = [0] * len(p) + [1] * (len(ids) - len(p))
            ids, mask = ids[:a.max_seq_len], mask[:a.max_seq_len]
            mask[0] = 0
            seqs.append((ids, mask))
        n = max(len(i) for i, _ in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in seqs])
        attn = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in seqs])
        labels = torch.tensor([[t if m else -100 for t, m in zip(i, k)] + [-100] * (n - len(i))
                               for i, k in seqs])
        return {"input_ids": input_ids, "attention_mask": attn}, labels

    g = torch.Generator().manual_seed(a.seed)
    losses, step, started = [], 0, time.perf_counter()
    model.train()
    while step < total:
        order = torch.randperm(len(train), generator=g).tolist()
        for b in range(per_epoch):
            if step >= total:
                break
            rows = [train[i] for i in order[b * a.batch_size:(b + 1) * a.batch_size]]
            if causal:
                enc, y = encode_lm(rows)
            else:
                enc = encode(rows)
                y = torch.tensor([index[str(r["label"])] for r in rows])
            for grp in opt.param_groups:
                grp["lr"] = lr * lr_at(step)
            loss = model(**enc, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append([step, loss.item()])
    secs = time.perf_counter() - started
    model.eval()
    metric = {}
    with torch.no_grad():
        if causal:
            nll, count = 0.0, 0
            for b in range(0, len(valid), a.batch_size):
                enc, y = encode_lm(valid[b:b + a.batch_size])
                logits = model(**enc).logits[:, :-1].float()
                tgt = y[:, 1:]
                nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                         ignore_index=-100, reduction="sum").item()
                count += int((tgt != -100).sum())
            metric["loss"] = nll / max(1, count)
        else:
            correct = 0
            for b in range(0, len(valid), 64):
                rows = valid[b:b + 64]
                pred = model(**encode(rows)).logits.argmax(-1)
                correct += sum(int(p) == index.get(str(r["label"]), -1) for p, r in zip(pred.tolist(), rows))
            metric["accuracy"] = correct / len(valid)
    print(json.dumps({
        "impl": f"pytorch {torch.__version__}",
        "method": a.method, "seed": a.seed, "epochs": epochs, "steps": total, "lr": lr,
        **metric, "losses": losses, "step_secs": secs / max(1, total),
        "trainable_params": sum(p.numel() for _, p in params),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }), flush=True)


if __name__ == "__main__":
    main()
