"""The Hugging Face mask patterns on the op, against what transformers runs without mmcore
(`mmcore bench --op masks`).

Each case is one attention call of a multimodal / Gemma-family model, as transformers' "sdpa"
implementation runs it: F.scaled_dot_product_attention with the dense (B, 1, Sq, Sk) bool
mask transformers builds (its O(Sq·Sk) construction excluded), or, for soft-capping (which
SDPA cannot express), the eager matmul-softmax-matmul path transformers falls back to.  mmcore
runs the same call with `backend="auto"` and the compact arguments: bounds (lo, hi) (B, Sq),
key_mask (B, Sk), softcap.  Before mmcore had these arguments, its HF interface sent the same
calls to a dense path equal to the baseline.

Cases (S = 4096 full, 1024 quick; B = 2, H = 8, Hkv = 2, D = 64; fwd and fwd+bwd):
  * prefix-LM (PaliGemma): a bidirectional prefix of 256 image tokens + prompt, causal after;
  * image blocks in sliding text (Gemma 3): window 512, two image blocks of 256 tokens;
  * holey padding in a sliding-window layer (Mistral): window 512, 10 % of keys hidden;
  * soft-capped causal sliding window (Gemma 2): softcap 50, window 512.
Every mmcore output is checked against the baseline's at the warm-up call (a mismatch raises).
Useful FLOPs: 4·B·H·D·(allowed pairs), fwd+bwd 3.5x.  Ratios: baseline ms / mmcore ms
(> 1: mmcore faster).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmcore
from mmcore.benchmarks import harness as H

OP = "masks"
B, HQ, HKV, D, W, IMG = 2, 8, 2, 64, 512, 256


def _rows(S, device):
    return torch.arange(S, device=device)[None].expand(B, S)


def _bounds_prefix(S, device, IMG=IMG):
    i = _rows(S, device)
    P = torch.tensor([[IMG + 40], [IMG + 90]], device=device)
    return torch.zeros_like(i), torch.maximum(i + 1, P)


def _bounds_blocks(S, device, W=W, IMG=IMG):
    i = _rows(S, device)
    lo, hi = i - W + 1, i + 1
    for s in (S // 4, S // 2):
        e = s + IMG
        inside = (i >= s) & (i < e)
        lo = torch.where(inside, torch.clamp(lo, max=s), lo)
        hi = torch.where(inside, torch.full_like(hi, e), hi)
    return lo, hi


def _dense_from_bounds(lo, hi, S, key_mask=None):
    j = torch.arange(S, device=lo.device)[None, None, :]
    m = (j >= lo[:, :, None]) & (j < hi[:, :, None])
    if key_mask is not None:
        m = m & key_mask[:, None, :]
    return m[:, None]


def _sliding(S, device, W=W):
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (j > i - W)


def _holes(S, device):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(B, S, generator=g) > 0.1
    m[:, 0] = True  # every row sees a key (SDPA gives NaN rows otherwise)
    return m.to(device)


def _eager_softcap(mask, c, scale):
    """transformers' eager attention with soft-capping (GQA by repeat)."""
    def fn(q, k, v):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.matmul(q, k.transpose(2, 3)) * scale
        s = torch.tanh(s / c) * c
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)
    return fn


def _cases(S, device, W=W, IMG=IMG):
    """-> [(name, baseline name, baseline fn, mmcore fn, mask (for FLOPs))]; W the sliding
    window, IMG the image tokens of a block."""
    scale = D ** -0.5
    out = []
    lo, hi = _bounds_prefix(S, device, IMG)
    m = _dense_from_bounds(lo, hi, S)
    out.append(("prefix-LM (PaliGemma)", "sdpa (dense bool mask)",
                lambda q, k, v, m=m: F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                    enable_gqa=True),
                lambda q, k, v, lo=lo, hi=hi: mmcore.window_attention(q, k, v,
                                                                      key_bounds=(lo, hi)), m))
    lo, hi = _bounds_blocks(S, device, W, IMG)
    m = _dense_from_bounds(lo, hi, S)
    out.append(("image blocks in sliding text (Gemma 3)", "sdpa (dense bool mask)",
                lambda q, k, v, m=m: F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                    enable_gqa=True),
                lambda q, k, v, lo=lo, hi=hi: mmcore.window_attention(q, k, v,
                                                                      key_bounds=(lo, hi)), m))
    km = _holes(S, device)
    m = _sliding(S, device, W)[None, None] & km[:, None, None, :]
    out.append(("holey padding, sliding window (Mistral)", "sdpa (dense bool mask)",
                lambda q, k, v, m=m: F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                    enable_gqa=True),
                lambda q, k, v, km=km: mmcore.window_attention(q, k, v, window=(W - 1, 0),
                                                               causal=True, key_mask=km), m))
    m = _sliding(S, device, W)[None, None].expand(B, 1, S, S)
    out.append(("softcap 50, sliding window (Gemma 2)", "eager (softcap)",
                _eager_softcap(m, 50.0, scale),
                lambda q, k, v: mmcore.window_attention(q, k, v, window=(W - 1, 0), causal=True,
                                                        softcap=50.0), m))
    return out


def _call(fn, bwd, q, k, v, dout):
    if not bwd:
        return lambda: fn(q, k, v)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _check(name, ours, base, q, k, v, dout, bwd):
    a, b = ours(), base()
    a, b = (a,) if not bwd else a, (b,) if not bwd else b
    for x, y in zip(a, b):
        err = (x.float() - y.float()).abs().max().item()
        tol = 2e-3 * max(1.0, y.float().abs().max().item())
        if not err <= tol:
            raise AssertionError(f"{name}: mmcore differs from the baseline by {err:.3e}")


def run(quick: bool, device: str) -> list:
    rows: list = []
    S = 1024 if quick else 4096
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    for name, bname, base, ours, mask in _cases(S, device):
        pairs = int(mask.expand(B, 1, S, S).sum()) * HQ
        for bwd in ((False,) if quick else (False, True)):
            case = f"{'fwd+bwd' if bwd else 'fwd'} {name} S={S}"
            shape = dict(B=B, Hq=HQ, Hkv=HKV, S=S, D=D)
            if H.out_of_time():
                rows.append(H.skipped(OP, case, shape, dtype, device))
                continue
            q, k, v = mk(B, HQ, S, D), mk(B, HKV, S, D), mk(B, HKV, S, D)
            dout = mk(B, HQ, S, D)
            for t in (q, k, v):
                t.requires_grad_(bwd)
            fb, fo = _call(base, bwd, q, k, v, dout), _call(ours, bwd, q, k, v, dout)
            _check(case, fo, fb, q, k, v, dout, bwd)
            fl = 4 * D * pairs * (3.5 if bwd else 1.0)
            tb = H.time_fn(fb, device, warmup=1, rep=3 if quick else 5)
            to = H.time_fn(fo, device, warmup=1, rep=3 if quick else 5)
            rows.append(H.row(OP, case, bname, shape, dtype, device, tb, flops=fl))
            rows.append(H.row(OP, case, "mmcore:auto", shape, dtype, device, to, flops=fl,
                              baseline_ms=tb["median_ms"], baseline=bname))
    return rows
