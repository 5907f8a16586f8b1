"""Seeded generator of bad and odd inputs to the three ops (issue 16), and its driver.

Each case is either
  * bad: one argument made invalid -> the call must raise a TypeError / ValueError whose
    message names that argument; or
  * odd but valid (empty dims, S = 1, huge / -1 windows, int32 or strided lengths, strided
    tensors, extreme scales, 16-bit dtypes, all-padding samples, GQA, stacked adapters...) ->
    the answer (and gradients where asked) must equal the float64 oracle within the
    tolerance rule.
Anything else -- another exception, an error that does not name the argument, bad input
accepted, a wrong answer -- is a failure.  Run as a script (tests/test_fuzz_ops.py does, one
process per backend, so that a crash fails the test instead of killing pytest):

    python tests/fuzz_ops.py --backend cpu --n 40 --seed 0      # prints a JSON report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import traceback

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

import mmcore  # noqa: E402
from mmcore.ops import registry  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kit import (assert_close, attention_dense, lora_dense, noncontig,  # noqa: E402
                 poison_padding, window_mask)

BIG = (sys.maxsize, 2 ** 31 - 1, 2 ** 31, 10 ** 12)


# ------------------------------------------------------------------ attention


def attention_case(rng, op, impl):
    """A random valid attention case (a dict) within what `impl` declares."""
    dts = sorted((d for d in impl.dtypes if d != torch.float64), key=str)
    Hkv = rng.choice([1, 2])
    c = dict(op=op, B=rng.choice([1, 2, 2, 0]), Hq=Hkv * rng.choice([1, 2]), Hkv=Hkv,
             Sq=rng.choice([1, 2, 5, 17, 0]), Sk=rng.choice([1, 3, 9, 16, 0]),
             D=rng.choice([1, 3, 8, 17, 40]), dtype=rng.choice(dts), window=None,
             causal=False, G=0, sq=None, sk=None, scale=None, strided=rng.random() < 0.3,
             grads=rng.random() < 0.4)
    if rng.random() < 0.1:
        c["Hq"] = 0
    if rng.random() < 0.3:
        c["scale"] = rng.choice([1e-30, -0.7, 0.0, 3.0, 40.0, 1, torch.tensor(0.25)])
    if op == "window_attention":
        side = lambda: rng.choice([None, -1, 0, 1, 4, rng.choice(BIG)])  # noqa: E731
        c["window"] = rng.choice([None, (side(), side()), [side(), side()]])
        c["causal"] = rng.random() < 0.3
        c["G"] = min(rng.choice([0, 0, 1, c["Sk"]]), c["Sk"])
    if c["B"] and rng.random() < 0.5:
        dt = rng.choice([torch.int64, torch.int32])
        c["sk"] = torch.tensor([rng.randint(0, c["Sk"]) for _ in range(c["B"])], dtype=dt)
        if rng.random() < 0.5:
            c["sq"] = torch.tensor([rng.randint(0, c["Sq"]) for _ in range(c["B"])], dtype=dt)
        if rng.random() < 0.3:  # strided views of the same values
            c["sk"] = torch.stack([c["sk"], -c["sk"]], 1).reshape(-1)[::2]
    return c


def attention_tensors(c, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(c["B"], h, s, c["D"], generator=g)  # noqa: E731
    q, k, v, dout = mk(c["Hq"], c["Sq"]), mk(c["Hkv"], c["Sk"]), mk(c["Hkv"], c["Sk"]), \
        mk(c["Hq"], c["Sq"])
    q, dout = (poison_padding(t, c["sq"], 2) for t in (q, dout))
    k, v = (poison_padding(t, c["sk"], 2) for t in (k, v))
    ts = [t.to(c["dtype"]) for t in (q, k, v, dout)]
    if c["strided"]:
        ts = [noncontig(t) for t in ts]
    return ts


def oracle_side(w, reach):
    """A window side as the dense oracle's mask needs it (a side past every key is -1)."""
    return -1 if w is None or w < 0 or w >= reach else w


def attention_call(c, q, k, v, backend):
    kw = dict(seqlens_q=c["sq"], seqlens_k=c["sk"], scale=c["scale"], return_lse=True,
              backend=backend)
    if c["op"] == "window_attention":
        return mmcore.window_attention(q, k, v, window=c["window"], causal=c["causal"],
                                       global_tokens=c["G"], **kw)
    return mmcore.cross_attention(q, k, v, **kw)


def check_attention(c, backend, seed):
    q, k, v, dout = attention_tensors(c, seed)
    for t in (q, k, v):
        t.requires_grad_(c["grads"])
    out, lse = attention_call(c, q, k, v, backend)
    left, right = c["window"] if c["window"] is not None else (None, None)
    mask = window_mask(c["B"], c["Sq"], c["Sk"], oracle_side(left, c["Sk"]),
                       oracle_side(right, c["Sq"]), c["causal"], c["G"], c["sq"], c["sk"])
    scale = float(c["scale"]) if c["scale"] is not None else 1 / math.sqrt(c["D"])
    dclean = torch.where(mask.any(-1, keepdim=True), dout, torch.zeros((), dtype=dout.dtype))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_dense(qd, kd, vd, mask, scale, torch.float64)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base = attention_dense(qb, kb, vb, mask, scale, q.dtype)
    assert_close("out", out, ref[0], base[0])
    assert_close("lse", lse, ref[1], base[1])
    if c["grads"] and out.numel():
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref[0], (qd, kd, vd), dclean.double())
        bgot = torch.autograd.grad(base[0], (qb, kb, vb), dclean)
        for name, a, r, b in zip(("dq", "dk", "dv"), got, want, bgot):
            assert_close(name, a, r, b, grad=True)


def attention_bad(rng, c):
    """(mutated case kwargs for the call, names one of which the error must contain)."""
    q, k, v, _ = attention_tensors(c, 0)
    kw = dict(seqlens_q=c["sq"], seqlens_k=c["sk"], scale=c["scale"])
    if c["op"] == "window_attention":
        kw.update(window=c["window"], causal=c["causal"], global_tokens=c["G"])
    args = dict(q=q, k=k, v=v)
    B, Sk = c["B"], c["Sk"]
    choices = [
        ("q", lambda: args.update(q=q.flatten(0, 1))), ("k", lambda: args.update(k=k[..., None])),
        ("v", lambda: args.update(v=v.tolist())), ("q", lambda: args.update(q=q.long())),
        ("k", lambda: args.update(k=k.to(torch.float64 if k.dtype != torch.float64
                                         else torch.float32))),
        ("v", lambda: args.update(v=torch.empty(v.shape, device="meta", dtype=v.dtype))),
        ("k", lambda: args.update(k=torch.randn(B, c["Hkv"], Sk, c["D"] + 1).to(k.dtype))),
        ("k", lambda: args.update(k=torch.randn(B + 1, c["Hkv"], Sk, c["D"]).to(k.dtype),
                                  v=torch.randn(B + 1, c["Hkv"], Sk, c["D"]).to(v.dtype))),
        ("k", lambda: args.update(k=k[:, :0], v=v[:, :0])),  # Hkv = 0
        ("head dim", lambda: args.update(q=q[..., :0], k=k[..., :0], v=v[..., :0])),
        ("seqlens_k", lambda: kw.update(seqlens_k=torch.full((B,), Sk + 1))),
        ("seqlens_q", lambda: kw.update(seqlens_q=torch.full((B,), -1))),
        ("seqlens_k", lambda: kw.update(seqlens_k=torch.zeros(B + 1, dtype=torch.long))),
        ("seqlens_q", lambda: kw.update(seqlens_q=torch.zeros(B))),
        ("seqlens_k", lambda: kw.update(seqlens_k=[Sk] * B)),
        ("seqlens_k", lambda: kw.update(seqlens_k=torch.zeros(B, 1, dtype=torch.long))),
        ("scale", lambda: kw.update(scale=rng.choice(["abc", "0.5", 1j, [0.5], float("nan"),
                                                      float("inf"), torch.ones(2), True]))),
        ("backend", None),
    ]
    if c["op"] == "window_attention":
        choices += [
            ("window", lambda: kw.update(window=rng.choice(
                [(-2, 0), (0, -7), (2 ** 63, 0), (0, 2 ** 70), (1.5, 0), ("1", 0), (True, 1),
                 3, (1, 2, 3), "full"]))),
            ("causal", lambda: kw.update(causal=rng.choice([1, "yes", None, 0.0]))),
            ("global_tokens", lambda: kw.update(global_tokens=rng.choice(
                [-1, 1.5, True, Sk + 1, 2 ** 64, "2"]))),
        ]
    if B == 0:  # no values to be out of range
        choices = [ch for ch in choices if ch[0] not in ("seqlens_k", "seqlens_q")]
    name, mutate = rng.choice(choices)
    backend_override = None
    if mutate is None:
        backend_override = rng.choice(["cuda-ish", "Torch", 3, ""])
    else:
        mutate()
    return name, args, kw, backend_override


# ------------------------------------------------------------------ lora_linear


def lora_case(rng, impl):
    dts = sorted((d for d in impl.dtypes if d != torch.float64), key=str)
    A = rng.choice([1, 1, 3])
    c = dict(lead=rng.choice([(0,), (1,), (5,), (2, 3), (2, 0, 4)]), K=rng.choice([0, 1, 8, 19]),
             N=rng.choice([1, 6, 16]), r=rng.choice([1, 2, 5]), A=A, stacked=A > 1 or
             rng.random() < 0.3, dtype=rng.choice(dts), bias=rng.choice([None, "plain",
                                                                         "strided"]),
             ids=None, strided=rng.random() < 0.3, grads=rng.random() < 0.4,
             scaling=rng.choice([0.5, -2.0, 0.0, 1, "tensor"]))
    if c["stacked"] and rng.random() < 0.7:
        c["ids"] = rng.choice(["token", "sequence"])
    return c


def lora_tensors(c, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(c["dtype"])  # noqa: E731
    x, w = mk(*c["lead"], c["K"]), mk(c["N"], c["K"])
    a, b = mk(c["A"], c["r"], c["K"]), mk(c["A"], c["N"], c["r"])
    bias = None
    if c["bias"] == "plain":
        bias = mk(c["N"])
    elif c["bias"] == "strided":
        bias = mk(2 * c["N"])[::2]
    if c["strided"] and x.dim() >= 2:
        x = noncontig(x)
    if not c["stacked"]:
        a, b = a[0], b[0]
    if c["scaling"] == "tensor":
        s = torch.randn(c["A"], generator=g) if c["stacked"] else torch.randn(1, generator=g)
    else:
        s = c["scaling"] if not c["stacked"] else torch.full((c["A"],), float(c["scaling"]))
    ids = None
    if c["ids"] == "token":
        ids = torch.randint(-1, c["A"], c["lead"], generator=g)
    elif c["ids"] == "sequence":
        ids = torch.randint(-1, c["A"], c["lead"][:1], generator=g)
    return x, w, bias, a, b, s, ids


def check_lora(c, backend, seed):
    x, w, bias, a, b, s, ids = lora_tensors(c, seed)
    x.requires_grad_(c["grads"])
    a.requires_grad_(c["grads"])
    b.requires_grad_(c["grads"])
    y = mmcore.lora_linear(x, w, bias, a, b, s, adapter_ids=ids, backend=backend)
    lead, K, N = c["lead"], c["K"], c["N"]
    M = math.prod(lead)
    A3, B3 = (a, b) if c["stacked"] else (a[None], b[None])
    s_t = s if isinstance(s, torch.Tensor) else torch.tensor([float(s)])
    flat_ids = None
    if ids is not None:
        flat_ids = (ids if ids.shape == lead else
                    ids.reshape(-1, *[1] * (len(lead) - 1)).expand(lead)).reshape(-1)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, A3, B3))
    ref = lora_dense(xd.reshape(M, K), w.double(), bias, ad, bd, s_t.double(), flat_ids,
                     torch.float64)
    xb, ab, bb = (t.detach().clone().requires_grad_() for t in (x, A3, B3))
    base = lora_dense(xb.reshape(M, K), w, bias, ab, bb, s_t.to(x.dtype), flat_ids, x.dtype)
    assert_close("y", y.reshape(M, N), ref, base)
    if c["grads"] and y.numel():
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype)
        got = torch.autograd.grad(y, (x, a, b), dy)
        want = torch.autograd.grad(ref, (xd, ad, bd), dy.reshape(M, N).double())
        bgot = torch.autograd.grad(base, (xb, ab, bb), dy.reshape(M, N))
        for name, g_, r, bs in zip(("dx", "da", "db"), got, want, bgot):
            assert_close(name, g_.reshape(r.shape), r, bs, grad=True)


def lora_bad(rng, c):
    x, w, bias, a, b, s, ids = lora_tensors(c, 0)
    args = dict(x=x, weight=w, bias=bias, lora_a=a, lora_b=b, scaling=s)
    kw = dict(adapter_ids=ids)
    K, N = c["K"], c["N"]
    choices = [
        ("x", lambda: args.update(x=x.int())), ("x", lambda: args.update(x=torch.tensor(1.0))),
        ("x", lambda: args.update(x=x.tolist())),
        ("weight", lambda: args.update(weight=w[0])),
        ("weight", lambda: args.update(weight=torch.randn(N, K + 1).to(w.dtype))),
        ("weight", lambda: args.update(weight=w.to(torch.float64 if w.dtype != torch.float64
                                                   else torch.float32))),
        ("bias", lambda: args.update(bias=rng.choice([1.0, torch.randn(N + 1).to(w.dtype),
                                                      torch.randn(1, N).to(w.dtype), [0.0]]))),
        ("lora_a", lambda: args.update(lora_a=rng.choice([a.tolist(), a.flatten(-2),
                                                          a[..., None, None]]))),
        ("lora_b", lambda: args.update(lora_b=b[..., :1, :] if b.shape[-2] > 1 else b[..., :0])),
        ("lora_a", lambda: args.update(lora_a=a[..., :0, :], lora_b=b[..., :0])),
        ("scaling", lambda: args.update(scaling=rng.choice(
            ["0.5", [0.5], None, torch.ones(c["A"] + 1), torch.ones(c["A"], dtype=torch.cfloat),
             torch.ones(c["A"], device="meta")]))),
        ("backend", None),
    ]
    if c["stacked"]:
        lead = c["lead"]
        choices += [
            ("adapter_ids", lambda: kw.update(adapter_ids=torch.zeros(lead).float())),
            ("adapter_ids", lambda: kw.update(adapter_ids=torch.zeros(*lead, 2,
                                                                      dtype=torch.long))),
            ("adapter_ids", lambda: kw.update(adapter_ids=torch.full(lead, c["A"]))
             if math.prod(lead) else kw.update(adapter_ids=torch.zeros(7, 7, dtype=torch.long))),
            ("adapter_ids", lambda: kw.update(adapter_ids=[0])),
        ]
    name, mutate = rng.choice(choices)
    backend_override = None
    if mutate is None:
        backend_override = rng.choice(["gpu", 7, "TRITON"])
    else:
        mutate()
    return name, args, kw, backend_override


# ------------------------------------------------------------------ driver


def run(backend, n, seed):
    """n cases per op (about half bad) -> list of failure strings (empty: all good)."""
    rng = random.Random(seed)
    failures, counts = [], {"bad": 0, "valid": 0}
    ops = ("window_attention", "cross_attention", "lora_linear")
    for i in range(n * len(ops)):
        op = ops[i % len(ops)]
        impl = registry.get(op, backend)
        c = lora_case(rng, impl) if op == "lora_linear" else attention_case(rng, op, impl)
        bad = rng.random() < 0.5
        counts["bad" if bad else "valid"] += 1
        try:
            if not bad:
                (check_lora if op == "lora_linear" else check_attention)(c, backend, i)
                continue
            make = lora_bad if op == "lora_linear" else attention_bad
            name, args, kw, be = make(rng, c)
            fn = getattr(mmcore, op)
            try:
                fn(*args.values(), backend=be if be is not None else backend, **kw)
            except (TypeError, ValueError) as e:
                if not re.search(rf"(^|\W){re.escape(name)}(\W|$)", str(e)):
                    failures.append(f"{op} #{i}: bad {name}: error does not name it: {e!r}")
                continue
            failures.append(f"{op} #{i}: bad {name} accepted")
        except Exception:
            failures.append(f"{op} #{i} ({'bad' if bad else 'valid'}) {c}: "
                            f"{traceback.format_exc(limit=3)}")
    return failures, counts


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    failures, counts = run(a.backend, a.n, a.seed)
    print(json.dumps(dict(failures=failures, counts=counts)))


if __name__ == "__main__":
    main()
