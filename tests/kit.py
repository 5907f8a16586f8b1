"""Test kit: float64 oracles with explicit masks, the tolerance rule (docs/design.md), poisoning,
and a seeded random-case generator driven by the backends' capability declarations."""
from __future__ import annotations

import math
import random

import torch

from mmcore.ops import registry

# ------------------------------------------------------------------ oracles (dense, explicit)


def window_mask(B, Sq, Sk, left, right, causal, G, seqlens_q=None, seqlens_k=None,
                device="cpu"):
    """allowed(b, i, j) of docs/design.md as a dense (B, 1, Sq, Sk) bool tensor."""
    if causal:
        right = 0
    Lq = seqlens_q.cpu() if seqlens_q is not None else torch.full((B,), Sq)
    Lk = seqlens_k.cpu() if seqlens_k is not None else torch.full((B,), Sk)
    i = torch.arange(Sq)[None, :, None]
    j = torch.arange(Sk)[None, None, :]
    p = i + (Lk - Lq)[:, None, None]
    inwin = torch.ones(B, Sq, Sk, dtype=torch.bool)
    if left >= 0:
        inwin &= j >= p - left
    if right >= 0:
        inwin &= j <= p + right
    glob = (j < G) | (p < G)
    if causal:
        glob &= j <= p
    m = (i < Lq[:, None, None]) & (j < Lk[:, None, None]) & (inwin | glob)
    return m[:, None].to(device)


def bounds_mask(lo, hi, key_mask=None, seqlens_q=None, seqlens_k=None, Sk=None):
    """Bounds mode of docs/design.md as a dense (B, 1, Sq, Sk) bool tensor: row i of sample b
    sees keys lo[b, i] <= j < hi[b, i], j < Lk_b, i < Lq_b, and key_mask[b, j]."""
    B, Sq = lo.shape
    Sk = key_mask.shape[1] if Sk is None else Sk
    lo, hi = lo.cpu().long()[:, :, None], hi.cpu().long()[:, :, None]
    j = torch.arange(Sk)[None, None, :]
    m = (j >= lo) & (j < hi)
    m &= with_lengths(B, Sq, Sk, seqlens_q, seqlens_k)
    if key_mask is not None:
        m &= key_mask.cpu()[:, None, :]
    return m[:, None]


def with_lengths(B, Sq, Sk, seqlens_q=None, seqlens_k=None):
    """(B, Sq, Sk) bool: i < Lq_b and j < Lk_b."""
    Lq = seqlens_q.cpu() if seqlens_q is not None else torch.full((B,), Sq)
    Lk = seqlens_k.cpu() if seqlens_k is not None else torch.full((B,), Sk)
    return (torch.arange(Sq)[None, :, None] < Lq[:, None, None]) & \
        (torch.arange(Sk)[None, None, :] < Lk[:, None, None])


def attention_dense(q, k, v, mask, scale, dtype, softcap=None, keep=None, p=0.0):
    """Plain dense attention in `dtype` with explicit mask; fully masked rows -> 0, lse -inf.

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), mask (B, 1, Sq, Sk); softcap c: scores capped to
    c·tanh(s / c) before masking; keep (B, Hq, Sq, Sk) bool: attention dropout's mask, the
    weights times keep / (1 - p) (lse stays the undropped softmax's).  Returns out, lse."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # zero what the mask hides so NaN poison in padding cannot leak into the reference
    qmask = mask.any(-1, keepdim=True)  # (B, 1, Sq, 1)
    kmask = mask.any(-2).unsqueeze(-1)  # (B, 1, Sk, 1)
    q = torch.where(qmask, q, torch.zeros((), dtype=dtype))
    k = torch.where(kmask, k, torch.zeros((), dtype=dtype)).repeat_interleave(g, 1)
    v = torch.where(kmask, v, torch.zeros((), dtype=dtype)).repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(s - safe[..., None])
    if keep is not None:
        w = w * keep.to(dtype) / (1 - p)
    return w @ v, lse


def oracle_attention(q, k, v, mask, scale, dout=None, softcap=None):
    """Float64 CPU oracle: (out, lse[, dq, dk, dv])."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_(dout is not None)
                     for t in (q, k, v))
    out, lse = attention_dense(q64, k64, v64, mask.cpu(), scale, torch.float64, softcap)
    if dout is None:
        return out, lse
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.detach().cpu().double())
    return out, lse, dq, dk, dv


def base_attention(q, k, v, mask, scale, dout=None, softcap=None):
    """The plain PyTorch computation in the input dtype (the tolerance rule's `base`)."""
    qb, kb, vb = (t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v))
    out, lse = attention_dense(qb, kb, vb, mask.to(q.device), scale, q.dtype, softcap)
    if dout is None:
        return out, lse
    return (out, lse, *torch.autograd.grad(out, (qb, kb, vb), dout))


def lora_dense(x, w, b, A, Bm, s, ids, dtype):
    """x (M, K), w (N, K), A (nA, r, K), Bm (nA, N, r), s (nA,), ids (M,) or None."""
    x, w, A, Bm = x.to(dtype), w.to(dtype), A.to(dtype), Bm.to(dtype)
    y = x @ w.t()
    if b is not None:
        y = y + b.to(dtype)
    ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if ids is None else ids
    for a in range(A.shape[0]):
        sel = (ids == a).to(dtype)[:, None]
        y = y + sel * ((x @ A[a].t()) @ Bm[a].t()) * s[a].to(dtype)
    return y


# ------------------------------------------------------------------ the tolerance rule


def tolerance(berr, oracle_max, dtype, grad=False):
    """The tolerance rule: k * max|base - oracle| + 1e-5 + 4 * eps(dtype) * max|oracle|.

    k = 2 (3 for gradients); eps is torch.finfo of the output's dtype.  The last term is a few
    units in the last place at the output's magnitude: a kernel that sums in another order than
    `base` (BLAS picks its code path per CPU: AVX2 and AVX-512 round differently) may differ by
    that much even where `base` happens to round exactly onto the oracle."""
    return (3 if grad else 2) * berr + 1e-5 + 4 * torch.finfo(dtype).eps * oracle_max


def assert_close(name, out, oracle, base, grad=False):
    """The tolerance rule (see `tolerance`); NaN anywhere fails. Compares on the CPU in float64."""
    out64 = out.detach().cpu().double()
    ref = oracle.detach().cpu().double()
    b64 = base.detach().cpu().double()
    assert out64.shape == ref.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out64).any(), f"{name}: NaN in output"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out64), fin), f"{name}: inf pattern differs from oracle"
    err = (out64 - ref)[fin].abs().max().item() if fin.any() else 0.0
    berr = (b64 - ref)[fin].abs().max().item() if fin.any() else 0.0
    rmax = ref[fin].abs().max().item() if fin.any() else 0.0
    if math.isnan(berr):
        berr = 0.0
    tol = tolerance(berr, rmax, out.dtype, grad)
    assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (base err {berr:.3e})"


# ------------------------------------------------------------------ poisoning


def poison_allocator(device, nbytes=1 << 24):
    """Fill and free a block so that fresh allocations on `device` likely hold NaN."""
    t = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del t


def poison_padding(t, lengths, dim):
    """NaN into t beyond lengths[b] along `dim` (t's dim 0 is the batch); returns a copy."""
    t = t.detach().clone()
    if lengths is None:
        return t
    for b, L in enumerate(lengths.tolist()):
        t[b].narrow(dim - 1, L, t.shape[dim] - L).fill_(float("nan"))
    return t


def noncontig(t):
    """Same values, a non-contiguous layout with a contiguous last dim (for 4-D attention
    tensors: stored as (B, S, H, D) and viewed back)."""
    if t.dim() == 4:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if t.dim() >= 2:
        big = torch.empty(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype,
                          device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    return t


# ------------------------------------------------------------------ random cases

ODD_D = (40, 72, 80, 96)


def attention_cases(op, backend, n, seed, device="cpu", max_s=160, dims=(16, 32, 40, 64, 72,
                    80, 96, 128), dtypes=None, grads=True, features=True):
    """n random window/cross attention cases that `backend` declares it can serve.

    Each case is a dict: B, Hq, Hkv, Sq, Sk, D, dtype, window, causal, G, seqlens_q,
    seqlens_k (int64 or None), noncontig, scale, and (features=True, where the backend
    declares them) softcap, key_bounds (lo, hi), key_mask.  A draw the backend's check()
    refuses (e.g. a banded window for `sdpa`) is redrawn in the shapes it serves
    (conform_window)."""
    impl = registry.get(op, backend)
    rng = random.Random(seed)
    frng = random.Random(seed + 100003)  # the features' own stream: older draws unchanged
    cases = []
    for c in _draw_attention(op, impl, n, rng, max_s, dims, dtypes):
        c = draw_features(op, impl, c, frng, 0.35 if features else 0.0)
        redraw = random.Random(seed * 7919 + len(cases))
        for _ in range(50):
            if not impl.refuse(case_problem(op, c, device, grads)):
                break
            c = conform_window(c, redraw)
        else:
            raise AssertionError(f"{backend} refuses every redraw of {c}: "
                                 f"{impl.refuse(case_problem(op, c, device, grads))}")
        cases.append(c)
    return cases


def case_problem(op, c, device="cpu", grads=False):
    """The dispatch Problem of a case (as the op builds it from the call)."""
    import importlib
    from types import SimpleNamespace

    X = importlib.import_module("mmcore.ops.cross_attention")
    W = importlib.import_module("mmcore.ops.window_attention")
    dev = torch.device(device)
    q = SimpleNamespace(shape=(c["B"], c["Hq"], c["Sq"], c["D"]), device=dev, dtype=c["dtype"])
    k = SimpleNamespace(shape=(c["B"], c["Hkv"], c["Sk"], c["D"]), device=dev, dtype=c["dtype"])
    softcap = c.get("softcap") or 0.0
    if op == "cross_attention":
        return X.problem(q, k, c["seqlens_q"], c["seqlens_k"], grads, softcap)
    left, right = c["window"] if c["window"] is not None else (-1, -1)
    left, right = -1 if left is None else left, -1 if right is None else right
    kb = c.get("key_bounds")
    return W.problem(q, k, c["seqlens_q"], c["seqlens_k"], left, 0 if c["causal"] else right,
                     c["causal"], c["G"], grads, softcap, None if kb is None else kb[0],
                     c.get("key_mask"))


def draw_features(op, impl, c, rng, p=0.35):
    """Add softcap / key_bounds / key_mask to a case, each with probability p, where `impl`
    declares it (its own random stream).  Bounds replace the window pattern."""
    c = dict(c, softcap=None, key_bounds=None, key_mask=None)
    B, Sq, Sk = c["B"], c["Sq"], c["Sk"]
    if impl.supports_softcap and rng.random() < p:
        c["softcap"] = rng.choice([0.5, 2.0, 8.0, 30.0])
    if op != "window_attention":
        return c
    if impl.supports_key_bounds and rng.random() < p:
        c["window"], c["causal"], c["G"] = None, False, 0
        c["key_bounds"] = random_bounds(B, Sq, Sk, rng)
    if impl.supports_key_mask and rng.random() < p:
        c["key_mask"] = random_key_mask(B, Sk, rng)
    return c


def random_bounds(B, Sq, Sk, rng):
    """(lo, hi) int64 (B, Sq): a mix of structured rows (causal, prefix-LM, a block, a band)
    and random ones, with empty rows and values outside [0, Sk]."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    i = torch.arange(Sq)[None].expand(B, Sq)
    kind = rng.choice(["causal", "prefix", "band", "random"])
    if kind == "causal":
        lo, hi = torch.zeros_like(i), i + 1 + (Sk - Sq)
    elif kind == "prefix":
        P = torch.randint(0, Sk + 1, (B, 1), generator=g)
        lo, hi = torch.zeros_like(i), torch.maximum(i + 1, P)
    elif kind == "band":
        w = rng.randint(0, 8)
        lo, hi = i - w, i + 1 + rng.randint(0, 3)
    else:
        lo = torch.randint(-3, Sk + 2, (B, Sq), generator=g)
        hi = lo + torch.randint(-2, Sk + 3, (B, Sq), generator=g)
    empty = torch.rand(B, Sq, generator=g) < 0.1
    hi = torch.where(empty, lo, hi)
    return lo.contiguous(), hi.contiguous()


def random_key_mask(B, Sk, rng):
    """(B, Sk) bool with holes, left padding or a fully hidden sample."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    kind = rng.choice(["holes", "left", "none_seen"] if B > 1 else ["holes", "left"])
    m = torch.rand(B, Sk, generator=g) > 0.3
    if kind == "left":
        start = torch.randint(0, Sk + 1, (B, 1), generator=g)
        m = torch.arange(Sk)[None] >= start
    elif kind == "none_seen":
        m[0] = False
    return m


def conform_window(c, rng):
    """Redraw a window case as one SDPA expresses: dense (the window reaches every key), or
    causal with offset 0 (Sq == Sk, the same lengths tensor for q and k)."""
    c = dict(c)
    if rng.random() < 0.5:
        c["window"] = rng.choice([None, (-1, -1), (c["Sk"], c["Sq"]), (-1, c["Sq"] + 3)])
        c["causal"] = c["Sq"] == 1 and rng.random() < 0.5
    else:
        c["Sk"] = c["Sq"]
        c["window"], c["causal"] = rng.choice([((-1, 0), True), (None, True), ((-1, 0), False)])
        if not c["causal"]:
            c["G"] = 0
        c["G"] = min(c["G"], c["Sk"])
        L = None if rng.random() < 0.4 else torch.tensor(
            [rng.randint(0, c["Sq"]) for _ in range(c["B"])])
        c["seqlens_q"] = c["seqlens_k"] = L
    return c


def _draw_attention(op, impl, n, rng, max_s, dims, dtypes):
    dts = sorted((d for d in (dtypes or impl.dtypes) if d in impl.dtypes and d != torch.float64),
                 key=str)  # sorted: a frozenset's order changes between processes
    Ds = [d for d in dims if impl.max_head_dim is None or d <= impl.max_head_dim]
    for _ in range(n):
        B = rng.choice([1, 2, 3])
        Hkv = rng.choice([1, 2])
        g = rng.choice([1, 2, 3]) if impl.supports_gqa else 1
        Sq = rng.choice([1, 2, 17, 31, 63, 64, 65, rng.randint(1, max_s)])
        Sk = rng.choice([1, Sq, rng.randint(1, max_s)]) if op == "window_attention" else \
            rng.choice([1, 7, 49, 50, rng.randint(1, max_s)])
        c = dict(B=B, Hq=Hkv * g, Hkv=Hkv, Sq=Sq, Sk=Sk, D=rng.choice(Ds),
                 dtype=rng.choice(dts), noncontig=rng.random() < 0.3, scale=None,
                 window=None, causal=False, G=0, seqlens_q=None, seqlens_k=None)
        if rng.random() < 0.2:
            c["scale"] = rng.uniform(0.05, 0.5)
        if op == "window_attention":
            c["window"] = (rng.choice([-1, 0, 1, 5, 16, rng.randint(0, Sk)]),
                           rng.choice([-1, 0, 3, 16, rng.randint(0, Sk)]))
            c["causal"] = rng.random() < 0.4
            if impl.supports_global_tokens and rng.random() < 0.5:
                c["G"] = rng.randint(0, min(Sk, 8))
        mode = rng.random()
        if mode < 0.25 and Sq == Sk and op == "window_attention":
            L = torch.tensor([rng.randint(0, Sq) for _ in range(B)])
            c["seqlens_q"], c["seqlens_k"] = L, L.clone()
        elif mode < 0.6:
            c["seqlens_k"] = torch.tensor([rng.randint(0, Sk) for _ in range(B)])
            if rng.random() < 0.5:
                c["seqlens_q"] = torch.tensor([rng.randint(0, Sq) for _ in range(B)])
        yield c


def make_attention_inputs(c, device, requires_grad=True, seed=0):
    """Fresh random q, k, v (poisoned with NaN past the valid lengths), dout."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    q = mk(c["B"], c["Hq"], c["Sq"], c["D"]).to(c["dtype"])
    k = mk(c["B"], c["Hkv"], c["Sk"], c["D"]).to(c["dtype"])
    v = mk(c["B"], c["Hkv"], c["Sk"], c["D"]).to(c["dtype"])
    dout = mk(c["B"], c["Hq"], c["Sq"], c["D"]).to(c["dtype"])
    q = poison_padding(q, c["seqlens_q"], 2)
    k = poison_padding(k, c["seqlens_k"], 2)
    v = poison_padding(v, c["seqlens_k"], 2)
    if c.get("key_mask") is not None:  # hidden keys must never reach a row either
        hidden = ~c["key_mask"][:, None, :, None]
        k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    dout = poison_padding(dout, c["seqlens_q"], 2)
    ts = []
    for t in (q, k, v, dout):
        t = t.to(device)
        if c["noncontig"]:
            t = noncontig(t)
        ts.append(t)
    q, k, v, dout = ts
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, dout


def case_mask(c, device="cpu"):
    kb, km = c.get("key_bounds"), c.get("key_mask")
    if kb is not None:
        return bounds_mask(kb[0], kb[1], km, c["seqlens_q"], c["seqlens_k"], c["Sk"]).to(device)
    left, right = c["window"] if c["window"] is not None else (-1, -1)
    if km is not None:
        return window_mask(c["B"], c["Sq"], c["Sk"], -1 if left is None else left,
                           -1 if right is None else right, c["causal"], c["G"], c["seqlens_q"],
                           c["seqlens_k"]).__and__(km[:, None, None, :]).to(device)
    return window_mask(c["B"], c["Sq"], c["Sk"], -1 if left is None else left,
                       -1 if right is None else right, c["causal"], c["G"], c["seqlens_q"],
                       c["seqlens_k"], device)


def case_scale(c):
    return c["scale"] if c["scale"] is not None else 1.0 / math.sqrt(c["D"])


def check_attention_case(op, backend, c, device="cpu", grads=True, seed=0):
    """Run one case through mmcore (forced backend) and check fwd, lse and grads vs oracle."""
    import mmcore

    q, k, v, dout = make_attention_inputs(c, device, requires_grad=grads, seed=seed)
    mask = case_mask(c)
    scale = case_scale(c)
    sq = None if c["seqlens_q"] is None else c["seqlens_q"].to(device)
    sk = None if c["seqlens_k"] is None else c["seqlens_k"].to(device)
    softcap = c.get("softcap")
    kb, km = c.get("key_bounds"), c.get("key_mask")
    feats = {}
    if kb is not None:
        feats["key_bounds"] = (kb[0].to(device), kb[1].to(device))
    if km is not None:
        feats["key_mask"] = km.to(device)
    poison_allocator(device)
    if op == "window_attention":
        out, lse = mmcore.window_attention(q, k, v, window=c["window"], causal=c["causal"],
                                           global_tokens=c["G"], seqlens_q=sq, seqlens_k=sk,
                                           scale=c["scale"], softcap=softcap, return_lse=True,
                                           backend=backend, **feats)
    else:
        out, lse = mmcore.cross_attention(q, k, v, seqlens_q=sq, seqlens_k=sk, scale=c["scale"],
                                          softcap=softcap, return_lse=True, backend=backend)
    # padding rows of dout are NaN: zero them for the oracle (kernels must not read them)
    qvalid = mask.any(-1, keepdim=True).to(device)
    dclean = torch.where(qvalid, dout, torch.zeros((), dtype=dout.dtype, device=device))
    if grads:
        ref = oracle_attention(q, k, v, mask, scale, dclean, softcap)
        base = base_attention(q, k, v, mask, scale, dclean, softcap)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    else:
        ref = oracle_attention(q, k, v, mask, scale, softcap=softcap)
        base = base_attention(q, k, v, mask, scale, softcap=softcap)
    assert_close("out", out, ref[0], base[0])
    assert_close("lse", lse, ref[1], base[1])
    if grads:
        for name, got, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:], base[2:]):
            assert_close(name, got, r, b, grad=True)


def lora_cases(backend, n, seed, max_m=70, max_nk=96):
    """Random lora_linear cases within what `backend` declares."""
    impl = registry.get("lora_linear", backend)
    rng = random.Random(seed)
    dts = sorted((d for d in impl.dtypes if d != torch.float64), key=str)
    cases = []
    for _ in range(n):
        A = rng.choice([1, 1, 2, 5]) if impl.supports_multi_adapter else 1
        r = rng.choice([1, 2, 4, 8, 16, rng.randint(1, 32)])
        if impl.max_rank is not None:
            r = min(r, impl.max_rank)
        lead = rng.choice([(rng.randint(1, max_m),), (1,), (rng.randint(1, 4), rng.randint(1, 17))])
        cases.append(dict(
            lead=lead, K=rng.choice([1, 7, 16, 33, rng.randint(1, max_nk)]),
            N=rng.choice([1, 5, 16, 31, rng.randint(1, max_nk)]), r=r, A=A,
            stacked=A > 1 or rng.random() < 0.3, bias=rng.random() < 0.6,
            ids=(A > 1 or rng.random() < 0.2), per_seq=rng.random() < 0.3,
            dtype=rng.choice(dts), noncontig=rng.random() < 0.3,
            scaling=rng.uniform(0.1, 2.0)))
    return cases


def check_lora_case(backend, c, device="cpu", grads=True, seed=0):
    import mmcore

    g = torch.Generator().manual_seed(seed)
    dt = c["dtype"]
    mk = lambda *s: torch.randn(*s, generator=g).to(dt).to(device)  # noqa: E731
    x = mk(*c["lead"], c["K"])
    w = mk(c["N"], c["K"])
    b = mk(c["N"]) if c["bias"] else None
    A, N, r, K = c["A"], c["N"], c["r"], c["K"]
    la = mk(A, r, K) if c["stacked"] else mk(r, K)
    lb = mk(A, N, r) if c["stacked"] else mk(N, r)
    if c["stacked"]:
        s = (torch.rand(A, generator=g) + 0.1).to(device)
    else:
        s = c["scaling"]
    ids = None
    if c["ids"] and c["stacked"]:
        shape = c["lead"][:1] if c["per_seq"] else c["lead"]
        ids = torch.randint(-1, A, shape, generator=g).to(device)
    if c["noncontig"]:
        x, w = noncontig(x) if x.dim() >= 2 else x, noncontig(w)
    dy = mk(*c["lead"], N)
    for t in (x, la, lb):
        t.requires_grad_(grads)
    poison_allocator(device)
    y = mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, backend=backend)
    # normalised operands for the oracle
    A3 = la.detach() if c["stacked"] else la.detach()[None]
    B3 = lb.detach() if c["stacked"] else lb.detach()[None]
    s1 = s if isinstance(s, torch.Tensor) else torch.tensor([s])
    M = x.numel() // K
    ids_m = None
    if ids is not None:
        ids_m = (ids if not c["per_seq"] or len(c["lead"]) == 1 else
                 ids.reshape(-1, *([1] * (len(c["lead"]) - 1))).expand(c["lead"])).reshape(-1)
    def run(dtype, dev):  # noqa: E306
        xx = x.detach().reshape(M, K).to(dev).requires_grad_(grads)
        aa = A3.to(dev).requires_grad_(grads)
        bb = B3.to(dev).requires_grad_(grads)
        yy = lora_dense(xx, w.detach().to(dev), None if b is None else b.to(dev), aa, bb,
                        s1.to(dev), None if ids_m is None else ids_m.to(dev), dtype)
        if not grads:
            return (yy,)
        return (yy, *torch.autograd.grad(yy, (xx, aa, bb), dy.reshape(M, N).to(dev).to(dtype)))
    ref = run(torch.float64, "cpu")
    base = run(dt, device)
    assert_close("y", y.reshape(M, N), ref[0], base[0])
    if grads:
        dx, da, db = torch.autograd.grad(y, (x, la, lb), dy)
        assert_close("dx", dx.reshape(M, K), ref[1], base[1], grad=True)
        assert_close("dA", da.reshape(A3.shape), ref[2], base[2], grad=True)
        assert_close("dB", db.reshape(B3.shape), ref[3], base[3], grad=True)
