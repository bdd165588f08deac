#!/usr/bin/env python3
"""The PyTorch side of deploy/cuda/gpu-check.sh: the same shapes, methods and dtypes as
`sparsegrad gpu-check`'s benchmarks, on the same GPU, in plain PyTorch (no transformers: the
GPU machine has torch only). Reads <out>/ours.json, writes <out>/torch.json, and joins both
into <out>/results.json and <out>/report.md with our/PyTorch ratios and the issue's targets.

Methods, as ours: `full` (AdamW on everything), `lora` (r=8, alpha=16 on the MLP linears, head
trained), `sparsegrad` (MLP matrices frozen in autograd; their weight gradient is rotated,
gathered on a fixed 1% support, Adam-updated there and written back as W += P S Q^T; random
bases, as ours for timing). bf16 = parameters in bf16 with f32 master weights and moments
(what our engine does), via a float32 copy the optimizer steps.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {
    "bert-base": dict(arch="bert", vocab=30522, hidden=768, layers=12, heads=12, kv=12, ffn=3072, batch=32, seq=128),
    "llama-1.1b": dict(arch="llama", vocab=32000, hidden=2048, layers=22, heads=32, kv=4, ffn=5632, batch=4, seq=512),
}


class SparseState:
    """One MLP matrix trained SparseGrad's way (fixed support, rotated basis)."""

    def __init__(self, weight, k):
        out, inp = weight.shape
        dev = weight.device
        self.w = weight
        self.p = torch.randn(out, out, device=dev) / math.sqrt(out)
        self.q = torch.randn(inp, inp, device=dev) / math.sqrt(inp)
        self.support = torch.randperm(out * inp, device=dev)[:k].sort().values
        self.rows = torch.unique(self.support // inp)
        self.cols = torch.unique(self.support % inp)
        r_pos = torch.searchsorted(self.rows, self.support // inp)
        c_pos = torch.searchsorted(self.cols, self.support % inp)
        self.pos = r_pos * len(self.cols) + c_pos
        self.m = torch.zeros(k, device=dev)
        self.v = torch.zeros(k, device=dev)
        self.grad = None
        self.t = 0

    def on_grad(self, x, g):
        # G~ on the support's rows and columns only: (g P_r)^T (x Q_c), then gathered.
        x, g = x.float().reshape(-1, x.shape[-1]), g.float().reshape(-1, g.shape[-1])
        pr = self.p[:, self.rows]
        qc = self.q[:, self.cols]
        block = (g @ pr).t() @ (x @ qc)
        vals = block.reshape(-1)[self.pos]
        self.grad = vals if self.grad is None else self.grad + vals

    def step(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        if self.grad is None:
            return
        self.t += 1
        g = self.grad
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        ch = -lr * (self.m / (1 - b1 ** self.t)) / ((self.v / (1 - b2 ** self.t)).sqrt() + eps)
        out, inp = self.w.shape
        s = torch.zeros(out * inp, device=self.w.device)
        s[self.support] = ch
        upd = self.p @ (s.view(out, inp) @ self.q.t())
        with torch.no_grad():
            self.w.add_(upd.to(self.w.dtype))
        self.grad = None


class SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, state):
        ctx.save_for_backward(x, w)
        ctx.state = state
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.state.on_grad(x, g)
        return g @ w, None, None


class Linear(nn.Module):
    def __init__(self, inp, out, bias, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, inp, dtype=dtype) * 0.02)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype)) if bias else None
        self.sparse = None
        self.lora = None

    def forward(self, x):
        if self.sparse is not None:
            y = SparseLinearFn.apply(x, self.weight, self.sparse)
        else:
            y = x @ self.weight.t()
        if self.bias is not None:
            y = y + self.bias
        if self.lora is not None:
            a, b, scale = self.lora
            y = y + (x @ a.t() @ b.t()) * scale
        return y


class RMSNorm(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


def rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    f = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([f, f], -1).cos().to(x.dtype), torch.cat([f, f], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, c, dtype):
        super().__init__()
        h, self.heads, self.kv = c["hidden"], c["heads"], c["kv"]
        self.llama = c["arch"] == "llama"
        hd = h // self.heads
        bias = not self.llama
        self.q = Linear(h, h, bias, dtype)
        self.k = Linear(h, self.kv * hd, bias, dtype)
        self.v = Linear(h, self.kv * hd, bias, dtype)
        self.o = Linear(h, h, bias, dtype)
        if self.llama:
            self.n1, self.n2 = RMSNorm(h, dtype), RMSNorm(h, dtype)
            self.gate = Linear(h, c["ffn"], False, dtype)
            self.up = Linear(h, c["ffn"], False, dtype)
            self.down = Linear(c["ffn"], h, False, dtype)
        else:
            self.n1 = nn.LayerNorm(h, eps=1e-12, dtype=dtype)
            self.n2 = nn.LayerNorm(h, eps=1e-12, dtype=dtype)
            self.up = Linear(h, c["ffn"], True, dtype)
            self.down = Linear(c["ffn"], h, True, dtype)

    def mlp_linears(self):
        return [self.gate, self.up, self.down] if self.llama else [self.up, self.down]

    def attn(self, x):
        b, t, h = x.shape
        hd = h // self.heads
        q = self.q(x).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, hd).transpose(1, 2)
        if self.llama:
            pos = torch.arange(t, device=x.device)
            q, k = rope(q, pos), rope(k, pos)
            rep = self.heads // self.kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.llama)
        return self.o(y.transpose(1, 2).reshape(b, t, h))

    def forward(self, x):
        if self.llama:
            x = x + self.attn(self.n1(x))
            hdn = self.n2(x)
            return x + self.down(F.silu(self.gate(hdn)) * self.up(hdn))
        x = self.n1(x + self.attn(x))
        return self.n2(x + self.down(F.gelu(self.up(x))))


class Model(nn.Module):
    def __init__(self, c, dtype):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c["vocab"], c["hidden"], dtype=dtype)
        if c["arch"] == "bert":
            self.pos = nn.Embedding(512, c["hidden"], dtype=dtype)
            self.norm = nn.LayerNorm(c["hidden"], eps=1e-12, dtype=dtype)
            self.head = Linear(c["hidden"], 2, True, dtype)
        else:
            self.norm = RMSNorm(c["hidden"], dtype)
            self.head = Linear(c["hidden"], c["vocab"], False, dtype)
        self.blocks = nn.ModuleList([Block(c, dtype) for _ in range(c["layers"])])

    def loss(self, ids, labels):
        x = self.emb(ids)
        if self.c["arch"] == "bert":
            x = self.norm(x + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for b in self.blocks:
            x = b(x)
        if self.c["arch"] == "bert":
            return F.cross_entropy(self.head(x[:, 0]).float(), labels)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def run(shape, method, dtype_name, steps, warmup):
    c = SHAPES[shape]
    dev = torch.device("cuda")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device(dev):
        model = Model(c, dtype)
    sparse = []
    if method == "full":
        params = list(model.parameters())
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(model.head.parameters())
        for b in model.blocks:
            for lin in b.mlp_linears():
                out, inp = lin.weight.shape
                if method == "lora":
                    a = torch.empty(8, inp, device=dev, dtype=dtype)
                    nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                    a.requires_grad_(True)
                    bm = torch.zeros(out, 8, device=dev, dtype=dtype, requires_grad=True)
                    lin.lora = (a, bm, 16.0 / 8)
                    params += [a, bm]
                else:
                    lin.sparse = SparseState(lin.weight, max(1, round(0.01 * out * inp)))
                    sparse.append(lin.sparse)
        for p in params:
            p.requires_grad_(True)
    if dtype == torch.float32:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        master = None
    else:
        master = [p.detach().float().clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(master, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(5, c["vocab"], (c["batch"], c["seq"]), device=dev)
    labels = torch.arange(c["batch"], device=dev) % 2
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.loss(ids, labels)
        loss.backward()
        if master is not None:
            for p, mp in zip(params, master):
                mp.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master or params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                for p, mp in zip(params, master):
                    p.copy_(mp)
        for s in sparse:
            s.step(1e-5)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    r = dict(shape=shape, method=method, dtype=dtype_name, step_ms_median=times[len(times) // 2],
             step_ms_min=times[0], peak_mib=torch.cuda.max_memory_allocated() / 2**20,
             reserved_mib=torch.cuda.max_memory_reserved() / 2**20, final_loss=float(loss))
    del model, opt, params, master, sparse
    torch.cuda.empty_cache()
    return r


def fmt(x, f="{:.1f}"):
    return "—" if x is None else f.format(x)


def report(out_dir, ours, theirs):
    key = lambda r: (r["shape"], r["method"], r["dtype"])
    t = {key(r): r for r in theirs}
    o = {key(r): r for r in ours.get("bench", [])}
    rows, lines = [], []
    lines.append(f"# GPU check — {ours.get('device')} — torch {torch.__version__}, {torch.cuda.get_device_name()}\n")
    corr = ours.get("correctness", [])
    bad = [c for c in corr if not c["pass"]]
    lines.append(f"## Correctness: {len(corr) - len(bad)}/{len(corr)} within tolerance\n")
    lines.append("| model | check | metric | value | tolerance | |\n|---|---|---|---|---|---|")
    for c in corr:
        lines.append(f"| {c['model']} | {c['check']} | {c['metric']} | {c['value']:.2e} | {c['tol']:.0e} | {'ok' if c['pass'] else '**FAIL**'} |")
    lines.append("\n## Step time and peak memory (ours vs PyTorch)\n")
    lines.append("| shape | dtype | method | ours ms | torch ms | ours/torch | ours peak MiB | torch peak MiB | ours/torch |\n|---|---|---|---|---|---|---|---|---|")
    for k in sorted(set(o) | set(t)):
        a, b = o.get(k, {}), t.get(k, {})
        sa, sb = a.get("step_ms_median"), b.get("step_ms_median")
        ma, mb = a.get("peak_mib"), b.get("peak_mib")
        rows.append(dict(shape=k[0], method=k[1], dtype=k[2], ours=a, torch=b,
                         time_ratio=(sa / sb) if sa and sb else None, mem_ratio=(ma / mb) if ma and mb else None))
        err = a.get("error") or b.get("error")
        lines.append(f"| {k[0]} | {k[2]} | {k[1]} | {fmt(sa)} | {fmt(sb)} | {fmt(rows[-1]['time_ratio'], '{:.2f}')} | "
                     f"{fmt(ma, '{:.0f}')} | {fmt(mb, '{:.0f}')} | {fmt(rows[-1]['mem_ratio'], '{:.2f}')} |" + (f" error: {err}" if err else ""))
    lines.append("\n## Targets\n")
    targets = []
    for shape in SHAPES:
        for dt in ("f32", "bf16"):
            g = lambda m, f: o.get((shape, m, dt), {}).get(f)
            full, sg, lora = g("full", "step_ms_median"), g("sparsegrad", "step_ms_median"), g("lora", "peak_mib")
            sgm = g("sparsegrad", "peak_mib")
            tf = t.get((shape, "full", dt), {}).get("step_ms_median")
            for name, val, lim in [("SparseGrad step / our full FT step", sg / full if sg and full else None, 1.2),
                                   ("SparseGrad peak / our LoRA peak", sgm / lora if sgm and lora else None, 1.0),
                                   ("our full FT step / PyTorch full FT step", full / tf if full and tf else None, 1.5)]:
                targets.append(dict(shape=shape, dtype=dt, target=name, value=val, limit=lim, met=None if val is None else val <= lim))
                lines.append(f"- {shape} {dt}: {name} = {fmt(val, '{:.2f}')} (target ≤ {lim}) {'' if val is None else ('met' if val <= lim else '**not met**')}")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(ours=ours, torch=theirs, rows=rows, targets=targets), f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="bert-base,llama-1.1b")
    ap.add_argument("--methods", default="full,lora,sparsegrad")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    theirs = []
    path = os.path.join(a.out, "torch.json")
    for shape in a.shapes.split(","):
        for dt in a.dtypes.split(","):
            for m in a.methods.split(","):
                try:
                    r = run(shape, m, dt, a.steps, a.warmup)
                except Exception as e:  # an OOM or a missing kernel is a result, not a stop
                    r = dict(shape=shape, method=m, dtype=dt, error=repr(e)[:300])
                    torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                theirs.append(r)
                with open(path, "w") as f:
                    json.dump(theirs, f, indent=1)
    try:
        with open(os.path.join(a.out, "ours.json")) as f:
            ours = json.load(f)
    except FileNotFoundError:
        ours = {}
    report(a.out, ours, theirs)


if __name__ == "__main__":
    sys.exit(main())
