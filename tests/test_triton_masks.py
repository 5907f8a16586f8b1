"""Issue 26 in the Triton kernels (kernels/window_attention.py, kernels/cross_attention.py),
called directly, against a float64 dense oracle with the tolerance rule (tests/kit.py):

  * softcap c: scores c·tanh(s / c) before masking and softmax, forward and backward (the
    kernels' tanh is built from exp2; checked on its own too);
  * window_attention's bounds mode (key_lo, key_hi: row i sees lo_i <= j < hi_i), with empty
    rows and values outside [0, Sk];
  * key_mask (bool (B, Sk), False = never seen) in window and bounds mode;
  * fully masked rows: out 0, lse -inf, zero gradients, no NaN.

Under TRITON_INTERPRET=1 (conftest) the blocks are fwd 32x64, dQ 64x32, dK/dV 32x64, so the
shapes straddle several blocks; bounds mode's dK/dV row table works in 16-key granules.
"""
import pytest
import torch
import triton
import triton.language as tl

import kit
from kit import assert_close
from mmcore.kernels import cross_attention as C
from mmcore.kernels import window_attention as W

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# ------------------------------------------------------------------ the dense oracle


def dense(q, k, v, mask, scale, softcap, dtype):
    """Dense attention in `dtype`: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), mask (B, 1, Sq, Sk)
    bool; softcap c > 0 caps the scores to c·tanh(s / c) before the mask.  What the mask hides
    is zeroed first (a NaN there must not reach the reference).  Returns out, lse."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    zero = torch.zeros((), dtype=dtype)
    q = torch.where(mask.any(-1, keepdim=True), q, zero)
    kmask = mask.any(-2).unsqueeze(-1)
    k = torch.where(kmask, k, zero).repeat_interleave(g, 1)
    v = torch.where(kmask, v, zero).repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return p @ v, lse


def reference(q, k, v, mask, scale, softcap, dout, dtype):
    """(out, lse, dq, dk, dv) of `dense` in `dtype` (float64: the oracle; the input dtype:
    the tolerance rule's base)."""
    ts = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dense(*ts, mask, scale, softcap, dtype)
    return (out, lse, *torch.autograd.grad(out, ts, dout.detach().cpu().to(dtype)))


def check(got, q, k, v, mask, scale, softcap, dout):
    """got = (out, lse, dq, dk, dv) of a kernel; compared by the tolerance rule."""
    oracle = reference(q, k, v, mask, scale, softcap, dout, torch.float64)
    base = reference(q, k, v, mask, scale, softcap, dout, q.dtype)
    for name, g, o, b in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, base):
        assert_close(name, g, o, b, grad=name.startswith("d"))
    return oracle


def lengths_mask(B, Sq, Sk, seqlens_q, seqlens_k):
    """i < Lq_b and j < Lk_b as (B, Sq, Sk) (kit's rule)."""
    return kit.with_lengths(B, Sq, Sk, seqlens_q, seqlens_k)


def window_dense_mask(B, Sq, Sk, left, right, causal, G, seqlens_q=None, seqlens_k=None):
    """allowed(b, i, j) of docs/design.md as (B, Sq, Sk) (kit's oracle mask)."""
    return kit.window_mask(B, Sq, Sk, left, right, causal, G, seqlens_q, seqlens_k)[:, 0]


def bounds_dense_mask(lo, hi, key_mask, Sk, seqlens_q=None, seqlens_k=None):
    """Bounds mode: lo_i <= j < hi_i, within the lengths, AND key_mask -> (B, Sq, Sk)."""
    return kit.bounds_mask(lo, hi, key_mask, seqlens_q, seqlens_k, Sk)[:, 0]


def inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed, mag=1.5):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Sq, D, generator=g) * mag).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D, generator=g) * mag).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    return q, k, v, dout


def run_window(q, k, v, dout, seqlens_q, seqlens_k, left, right, causal, G, scale, **kw):
    out, lse = W.window_attention_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, G,
                                      scale, **kw)
    grads = W.window_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right,
                                   causal, G, scale, **kw)
    return (out, lse, *grads)


# ------------------------------------------------------------------ the tanh


@triton.jit
def _tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    y = W._tanh(x)  # the one tanh of both kernels' _scores
    tl.store(Y + offs, y, mask=offs < N)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # numpy: exp2(2e30), (1e30)²
def test_tanh(interpret):
    """The kernels' tanh (exp2-based, a series below |x| = 1/4) against float64: within 3e-7
    absolute and 1e-6 relative everywhere, exact signs, +-inf -> +-1, NaN -> NaN."""
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.logspace(-30, 1.5, 400),
                   -torch.logspace(-30, 1.5, 400), torch.tensor([0.0, 0.25, -0.25, 0.2499999,
                                                                 1e30, -1e30])])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf"), float("nan")])]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(interpret), y.to(interpret), x.numel(),
                                                 BLOCK=1024)
    y = y.cpu().double()
    ref = torch.tanh(x.double())
    fin = torch.isfinite(x)
    err = (y[fin] - ref[fin]).abs()
    assert err.max() <= 3e-7, err.max()
    assert (err / ref[fin].abs().clamp_min(1e-30)).max() <= 1e-6
    assert torch.equal(torch.sign(y[fin]), torch.sign(ref[fin]))
    assert y[-3].item() == 1.0 and y[-2].item() == -1.0 and torch.isnan(y[-1])


# ------------------------------------------------------------------ softcap


SOFTCAP_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, dtype, window (left, right), causal, G, lengths, softcap)
    "dense_fp32": (2, 2, 2, 70, 70, 32, F32, (-1, -1), False, 0, False, 2.0),
    "window_causal_globals_lengths_gqa": (2, 4, 2, 90, 90, 16, F32, (20, 0), True, 3, True,
                                          1.5),
    "window_bidir_sq_lt_sk": (1, 2, 1, 40, 100, 32, F32, (12, 7), False, 2, False, 3.0),
    "causal_bf16": (2, 2, 1, 75, 75, 32, BF16, (-1, 0), True, 0, True, 5.0),
    "window_fp16_gemma2": (1, 4, 2, 70, 70, 32, F16, (16, 0), True, 0, False, 50.0),
}


@pytest.mark.parametrize("name", list(SOFTCAP_CASES))
def test_window_softcap(interpret, name):
    B, Hq, Hkv, Sq, Sk, D, dt, (left, right), causal, G, lens, cap = SOFTCAP_CASES[name]
    q, k, v, dout = inputs(B, Hq, Hkv, Sq, Sk, D, dt, seed=len(name), mag=2.5)
    sq = sk = None
    if lens:
        sq, sk = torch.tensor([Sq, Sq - 29])[:B], torch.tensor([Sk, Sk - 29])[:B]
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)),
                     None if sq is None else sq.to(interpret),
                     None if sk is None else sk.to(interpret),
                     left, right, causal, G, scale, softcap=cap)
    mask = window_dense_mask(B, Sq, Sk, left, right, causal, G, sq, sk)[:, None]
    oracle = check(got, q, k, v, mask, scale, cap, dout)
    # the cap is active: without it the result is another one
    plain, _ = dense(q.double(), k.double(), v.double(), mask, scale, 0.0, torch.float64)
    if cap < 10:
        assert (plain - oracle[0]).abs().max() > 0.05


@pytest.mark.parametrize("dt", [F32, BF16])
def test_cross_softcap(interpret, dt):
    """cross_attention with softcap: lengths, GQA, one key block and several (BLOCK_N 32 under
    the interpreter), split dK/dV partials (Sq > 64)."""
    for Sk, cap in ((20, 1.5), (45, 4.0)):
        B, Hq, Hkv, Sq, D = 2, 4, 2, 70, 32
        q, k, v, dout = inputs(B, Hq, Hkv, Sq, Sk, D, dt, seed=Sk, mag=2.5)
        sq, sk = torch.tensor([Sq, 33]), torch.tensor([Sk, Sk - 9])
        scale = D ** -0.5
        dev = [t.to(interpret) for t in (q, k, v, dout, sq, sk)]
        out, lse = C.cross_attention_fwd(*dev[:3], dev[4], dev[5], scale, cap)
        grads = C.cross_attention_bwd(dev[3], *dev[:3], out, lse, dev[4], dev[5], scale, cap)
        mask = lengths_mask(B, Sq, Sk, sq, sk)[:, None]
        check((out, lse, *grads), q, k, v, mask, scale, cap, dout)


# ------------------------------------------------------------------ key_bounds


def random_bounds(B, Sq, Sk, seed):
    """Random (lo, hi) int32 (B, Sq): ranges of 0..40 keys, some rows empty (lo >= hi), some
    reaching below 0 or past Sk, and far-apart rows that see the same keys (the dK/dV kernel
    must find every query block that sees a key block, not only neighbouring ones)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(-10, Sk + 5, (B, Sq), generator=g)
    hi = lo + torch.randint(-5, 40, (B, Sq), generator=g)
    hi[:, ::7] = lo[:, ::7]  # empty
    lo[:, 3::11], hi[:, 3::11] = 10, 2  # lo > hi: empty
    lo[:, 5::13], hi[:, 5::13] = -(1 << 31), (1 << 31) - 1  # everything (clamped)
    lo[:, 6::13], hi[:, 6::13] = Sk + 3, Sk + 9  # past the end: empty
    return lo.to(torch.int32), hi.to(torch.int32)


def test_bounds_random(interpret):
    """Random bounds with empty rows and out-of-range values; lengths, GQA, Sq != Sk."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 90, 75, 32
    q, k, v, dout = inputs(B, Hq, Hkv, Sq, Sk, D, F32, seed=1)
    lo, hi = random_bounds(B, Sq, Sk, seed=2)
    sq, sk = torch.tensor([90, 61]), torch.tensor([75, 40])
    scale = D ** -0.5
    dev = [t.to(interpret) for t in (q, k, v, dout)]
    got = run_window(*dev, sq.to(interpret), sk.to(interpret), -1, -1, False, 0, scale,
                     key_lo=lo.to(interpret), key_hi=hi.to(interpret))
    mask = bounds_dense_mask(lo, hi, None, Sk, sq, sk)
    assert (~mask.any(-1)).sum() > 10 and mask.any(-1).sum() > 60  # empty rows and others
    check(got, q, k, v, mask[:, None], scale, 0.0, dout)
    empty = ~mask.any(-1)[:, None].expand(-1, Hq, -1)
    assert torch.isneginf(got[1].cpu()[empty]).all()
    assert (got[0].cpu()[empty] == 0).all() and (got[2].cpu()[empty] == 0).all()


def patterns(B, Sq, Sk):
    """The patterns of docs (SPEC-26) as bounds: causal, HF sliding window, prefix-LM with a
    per-sample prefix, a bidirectional image block inside causal text."""
    i = torch.arange(Sq)[None].expand(B, Sq)
    prefix = torch.tensor([23, 50])[:B, None]
    s, e = 30, 47  # an image block [s, e)
    img = (i >= s) & (i < e)
    return {
        "causal": (torch.zeros_like(i), i + 1),
        "sliding_9": (i - 8, i + 1),
        "prefix_lm": (torch.zeros_like(i), torch.maximum(i + 1, prefix)),
        "image_block": (torch.where(img, torch.minimum(i, torch.tensor(s)), 0),
                        torch.where(img, torch.maximum(i + 1, torch.tensor(e)), i + 1)),
    }


@pytest.mark.parametrize("name,dt", [("causal", BF16), ("sliding_9", F16), ("prefix_lm", F32),
                                     ("image_block", BF16)])
def test_bounds_patterns(interpret, name, dt):
    B, Hq, Hkv, S, D = 2, 2, 1, 80, 32
    lo, hi = (t.to(torch.int32) for t in patterns(B, S, S)[name])
    q, k, v, dout = inputs(B, Hq, Hkv, S, S, D, dt, seed=3)
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)), None, None, -1, -1, False,
                     0, scale, key_lo=lo.to(interpret), key_hi=hi.to(interpret))
    check(got, q, k, v, bounds_dense_mask(lo, hi, None, S)[:, None], scale, 0.0, dout)


def test_bounds_int64_and_decode(interpret):
    """int64 bounds (clamped to [0, Sk] by the launcher) and a decoding step (Sq <= 16: the
    split-K forward, several key splits) in bounds mode with softcap and key_mask; the hidden
    keys hold NaN."""
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 5, 150, 16
    q, k, v, dout = inputs(B, Hq, Hkv, Sq, Sk, D, F32, seed=4)
    i = torch.arange(Sq)[None].expand(B, Sq) + Sk - Sq
    lo = torch.stack([i[0] - 100, torch.full((Sq,), -(1 << 40))])
    hi = torch.stack([i[0] + 1, torch.full((Sq,), 1 << 40)])
    hi[1, 2] = -(1 << 40)  # an empty row
    km = torch.rand(B, Sk, generator=torch.Generator().manual_seed(5)) > 0.3
    hidden = ~km[:, None, :, None].expand_as(k)  # never loaded: no fix-up pass in split-K
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)), None, None, -1, -1, False,
                     0, scale, softcap=3.0, key_lo=lo.to(interpret), key_hi=hi.to(interpret),
                     key_mask=km.to(interpret))
    mask = bounds_dense_mask(lo, hi, km, Sk)
    check(got, q, k, v, mask[:, None], scale, 3.0, dout)


# ------------------------------------------------------------------ key_mask


def test_key_mask_window_left_padding_holes(interpret):
    """A causal sliding window (HF: left 7) over keys with left padding (sample 1) and holes
    (sample 0); the window still counts key indices.  Some masked keys hold NaN: they never
    reach a result.  Sample 1's padded rows see nothing: out 0, lse -inf, zero gradients."""
    B, Hq, Hkv, S, D = 2, 2, 1, 90, 32
    q, k, v, dout = inputs(B, Hq, Hkv, S, S, D, F16, seed=6)
    km = torch.ones(B, S, dtype=torch.bool)
    km[0, 10:14] = km[0, 40] = km[0, 64:80] = False  # holes, one of a whole key block
    km[1, :37] = False  # left padding
    # NaN in a masked key (each such block costs the interpreter a slow row-by-row pass)
    k[0, :, 40], v[0, :, 40] = float("nan"), float("nan")
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)), None, None, 7, 0, True, 0,
                     scale, key_mask=km.to(interpret))
    mask = window_dense_mask(B, S, S, 7, 0, True, 0) & km[:, None, :]
    check(got, q, k, v, mask[:, None], scale, 0.0, dout)
    for t in got:
        assert not torch.isnan(t.cpu()).any()
    dead = ~mask.any(-1)
    assert dead[1, :37].all() and torch.isneginf(got[1].cpu()[1][:, :37]).all()
    assert (got[2].cpu()[1, :, :37] == 0).all()  # dq of the padded rows


def test_key_mask_globals_lengths(interpret):
    """key_mask with global tokens (one of them masked), lengths and a bidirectional window,
    with softcap: every feature of window mode at once."""
    B, Hq, Hkv, S, D = 2, 2, 1, 70, 16
    q, k, v, dout = inputs(B, Hq, Hkv, S, S, D, F32, seed=7)
    km = torch.rand(B, S, generator=torch.Generator().manual_seed(8)) > 0.25
    km[:, 1] = False
    sq = sk = torch.tensor([70, 52])
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)), sq.to(interpret),
                     sk.to(interpret), 6, 9, False, 3, scale, softcap=2.5,
                     key_mask=km.to(interpret))
    mask = window_dense_mask(B, S, S, 6, 9, False, 3, sq, sk) & km[:, None, :]
    check(got, q, k, v, mask[:, None], scale, 2.5, dout)


@pytest.mark.parametrize("dt", [F32, BF16])
def test_key_mask_bounds(interpret, dt):
    """key_mask AND bounds: random bounds, random holes, one sample with no key at all."""
    B, Hq, Hkv, Sq, Sk, D = 3, 2, 1, 70, 66, 32
    q, k, v, dout = inputs(B, Hq, Hkv, Sq, Sk, D, dt, seed=9)
    lo, hi = random_bounds(B, Sq, Sk, seed=10)
    km = torch.rand(B, Sk, generator=torch.Generator().manual_seed(11)) > 0.3
    km[2] = False
    scale = D ** -0.5
    got = run_window(*(t.to(interpret) for t in (q, k, v, dout)), None, None, -1, -1, False,
                     0, scale, key_lo=lo.to(interpret), key_hi=hi.to(interpret),
                     key_mask=km.to(interpret))
    mask = bounds_dense_mask(lo, hi, km, Sk)
    check(got, q, k, v, mask[:, None], scale, 0.0, dout)
    assert torch.isneginf(got[1].cpu()[2]).all()
    assert (got[0].cpu()[2] == 0).all() and (got[3].cpu()[2] == 0).all()


def test_features_off_unchanged(interpret):
    """softcap 0.0 and no bounds / key_mask give bit-for-bit what the old call gives (the
    constexpr-gated code is off), and an all-True key_mask gives the same numbers."""
    B, Hq, Hkv, S, D = 1, 2, 1, 70, 32
    q, k, v, dout = (t.to(interpret) for t in inputs(B, Hq, Hkv, S, S, D, F32, seed=12))
    old = run_window(q, k, v, dout, None, None, 9, 0, True, 2, 0.2)
    off = run_window(q, k, v, dout, None, None, 9, 0, True, 2, 0.2, softcap=0.0, key_lo=None,
                     key_hi=None, key_mask=None)
    ones = run_window(q, k, v, dout, None, None, 9, 0, True, 2, 0.2,
                      key_mask=torch.ones(B, S, dtype=torch.bool, device=interpret))
    for a, b, c in zip(old, off, ones):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
