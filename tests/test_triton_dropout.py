"""Attention dropout in the `triton` backend's kernels (window_attention, cross_attention).

The kernels regenerate mmcore/ops/reference/dropout.py's counter-hash mask in uint32
arithmetic; element (b, h, i, j) must be kept or dropped exactly as the reference's `keep`.
Checked two ways, under TRITON_INTERPRET=1 on the CPU (small asymmetric blocks: window fwd
32x64, dQ 64x32, dK/dV 32x64; cross 32x32), or compiled where a GPU is present:

  * bit for bit: with V = I and dO = I (Sq = Sk = D) the output is the dropped weight matrix
    P∘Z and dV its transpose, so the kept set the kernels used (forward, and the dK/dV
    kernel's) is read off and compared with D.mask of the seed the op drew;
  * numerically: triton against the torch backend with the same seed (torch.manual_seed before
    each call) on window / cross cases (causal, bidirectional, global tokens, key_mask, key
    bounds, per-sample lengths with empty rows, GQA, split-K decoding, softcap), forward and
    backward, fp32 / fp16 / bf16, p = 0.1 and 0.5.  The tolerance rule's oracle is the torch
    backend in float64 (the same mask: it is a function of the indices only), its base the
    torch backend in the input dtype.

tests/test_ops_dropout.py runs its oracle tests on every declaring backend, triton included.
"""
import pytest
import torch

from kit import assert_close
from mmcore.ops import cross_attention, window_attention
from mmcore.ops.reference import dropout as D

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _run(op, backend, q, k, v, dout, seed, dtype=None, **kw):
    """-> [out, dq, dk, dv] of op on backend (inputs cast to dtype), the mask drawn after
    torch.manual_seed(seed)."""
    ts = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    out = op(*ts, backend=backend, **kw)
    grads = torch.autograd.grad(out, ts, dout.to(out.dtype))
    return [out.detach(), *grads]


def _compare(op, dev, q, k, v, seed, **kw):
    """triton vs the tolerance rule (oracle: torch backend in float64, base: torch backend in
    the input dtype), forward and gradients; -> the max errors against the oracle."""
    g = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g, dtype=torch.float64)
    ref = _run(op, "torch", q, k, v, dout, seed, torch.float64, **kw)
    base = _run(op, "torch", q, k, v, dout, seed, **kw)
    got = _run(op, "triton", *(t.to(dev) for t in (q, k, v)), dout.to(dev), seed, **kw)
    errs = {}
    for name, a, o, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        assert_close(name, a, o, b, grad=name != "out")
        errs[name] = (a.detach().cpu().double() - o).abs().max().item()
    # the dropout did something: p = 0 gives another output
    torch.manual_seed(seed)
    plain = op(*(t.to(dev) for t in (q, k, v)), backend="triton",
               **{**kw, "dropout_p": 0.0})
    assert (plain.double().cpu() - got[0].double().cpu()).abs().max() > 1e-2
    return errs


def _qkv(B, Hq, Hkv, Sq, Sk, Dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(B, Hq, Sq, Dh), mk(B, Hkv, Sk, Dh), mk(B, Hkv, Sk, Dh)


# ------------------------------------------------------------------ the mask, bit for bit

@pytest.mark.parametrize("op,p", [("window", 0.5), ("cross", 0.3)])
def test_kept_set_is_the_reference_mask(interpret, op, p):
    """V = I and dO = I: out = P∘Z (forward kernel) and dV = (P∘Z)ᵀ (dK/dV kernel); every
    nonzero weight is P / (1 - p) exactly where D.mask keeps it, 0 elsewhere.  S = 48 spans
    two key blocks of the forward and two query blocks of dK/dV; B = 2, H = 3 check the
    (b, h) level of the hash."""
    B, H, S, seed = 2, 3, 48, 17
    q, k, _ = _qkv(B, H, H, S, S, S, F32, seed=1)
    eye = torch.eye(S).expand(B, H, S, S).to(interpret)
    q, k = q.to(interpret), k.to(interpret)
    fn = window_attention if op == "window" else cross_attention
    kw = dict(window=(20, 20), global_tokens=2) if op == "window" else {}
    P = fn(q, k, eye, backend="triton", **kw)  # no dropout: the weights
    vg = eye.clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(q, k, vg, dropout_p=p, backend="triton", **kw)
    (dv,) = torch.autograd.grad(out, vg, eye)
    torch.manual_seed(seed)
    keep = D.mask(D.draw_seed(), B, H, S, S, p)
    P, out, dv = P.cpu().double(), out.detach().cpu().double(), dv.cpu().double()
    seen = P > 0
    assert seen.float().mean() > 0.5
    expect = torch.where(keep & seen, P / (1 - p), torch.zeros_like(P))
    assert torch.equal(out != 0, keep & seen)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=0)
    assert torch.equal(dv.transpose(-1, -2) != 0, keep & seen)
    torch.testing.assert_close(dv.transpose(-1, -2), expect, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ against the torch backend

WINDOW = {
    # name: (B, Hq, Hkv, Sq, Sk, D, dtype, p, op kwargs)
    "causal_gqa_f32": (2, 4, 2, 70, 70, 16, F32, 0.5, dict(window=(9, 0), causal=True)),
    "bidir_global_f16": (1, 2, 1, 75, 75, 32, F16, 0.1, dict(window=(6, 6), global_tokens=3)),
    "sinks_causal_bf16": (1, 2, 2, 66, 66, 16, BF16, 0.5,
                          dict(window=(5, 0), causal=True, global_tokens=2)),
    "varlen_f32": (3, 2, 1, 40, 52, 16, F32, 0.1,
                   dict(window=(7, 3), seqlens_q=torch.tensor([40, 17, 30]),
                        seqlens_k=torch.tensor([52, 29, 0]))),
    "key_mask_softcap_f16": (2, 2, 1, 45, 45, 16, F16, 0.5,
                             dict(window=(12, 12), softcap=3.0,
                                  key_mask=torch.rand(2, 45, generator=torch.Generator()
                                                      .manual_seed(0)) > 0.3)),
    "key_bounds_f32": (1, 2, 1, 50, 50, 16, F32, 0.5,
                       dict(key_bounds=((torch.arange(50) - 9).clamp(min=0)[None],
                                        (torch.arange(50) + 4).clamp(max=50)[None]))),
    "decode_split_k_f32": (2, 4, 2, 3, 150, 16, F32, 0.5,
                           dict(window=(120, 0), causal=True, global_tokens=2,
                                seqlens_k=torch.tensor([150, 61]))),
}


@pytest.mark.parametrize("name", list(WINDOW))
def test_window_dropout_matches_torch(interpret, name):
    B, Hq, Hkv, Sq, Sk, Dh, dt, p, kw = WINDOW[name]
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dh, dt, seed=len(name))
    kw = {n: (tuple(t.to(interpret) for t in x) if isinstance(x, tuple) and n == "key_bounds"
              else x.to(interpret) if isinstance(x, torch.Tensor) and n == "key_mask" else x)
          for n, x in kw.items()}
    _compare(window_attention, interpret, q, k, v, seed=5, dropout_p=p, **kw)


CROSS = {
    # lengths with padded query rows and a sample with no keys (rows 0, gradients 0)
    "lengths_empty_f32": (3, 4, 2, 40, 45, 16, F32, 0.1,
                          dict(seqlens_q=torch.tensor([40, 23, 9]),
                               seqlens_k=torch.tensor([45, 0, 30]))),
    "short_k_softcap_bf16": (2, 2, 1, 36, 20, 32, BF16, 0.5, dict(softcap=2.5)),
    "split_q_f16": (1, 2, 2, 70, 33, 16, F16, 0.5, dict(seqlens_k=torch.tensor([31]))),
}


@pytest.mark.parametrize("name", list(CROSS))
def test_cross_dropout_matches_torch(interpret, name):
    B, Hq, Hkv, Sq, Sk, Dh, dt, p, kw = CROSS[name]
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dh, dt, seed=len(name))
    _compare(cross_attention, interpret, q, k, v, seed=9, dropout_p=p, **kw)
    if name == "lengths_empty_f32":
        torch.manual_seed(1)
        out = cross_attention(q.to(interpret), k.to(interpret), v.to(interpret),
                              dropout_p=p, backend="triton", **kw).cpu()
        assert (out[1] == 0).all() and (out[2, :, 9:] == 0).all() and torch.isfinite(out).all()


def test_same_seed_same_mask_new_seed_new_mask(interpret):
    """The op draws a seed per call: two calls after the same torch.manual_seed agree bit for
    bit (forward and backward: the backward regenerates the mask), two in a row differ."""
    q, k, v = (t.to(interpret) for t in _qkv(1, 2, 1, 40, 40, 16, F32, seed=3))
    dout = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(4)).to(interpret)
    a = _run(window_attention, "triton", q, k, v, dout, 7, window=(8, 8), dropout_p=0.3)
    b = _run(window_attention, "triton", q, k, v, dout, 7, window=(8, 8), dropout_p=0.3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.manual_seed(7)
    c = window_attention(q, k, v, window=(8, 8), dropout_p=0.3, backend="triton")
    d = window_attention(q, k, v, window=(8, 8), dropout_p=0.3, backend="triton")
    assert torch.equal(c, a[0]) and not torch.allclose(c, d)
