"""The C++ CPU kernels' softcap, bounds mode (key_lo / key_hi) and key_mask (issue 26), called
as torch.ops.mmcore_C.* directly, forward and backward, against a float64 dense oracle with the
tolerance rule (tests/kit.py).  The public API and the other backends are tested elsewhere."""
from __future__ import annotations

import pytest
import torch

import mmcore  # noqa: F401  (loads mmcore._C)
from kit import assert_close, base_attention, bounds_mask, oracle_attention, window_mask

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mmcore_C, "window_attention_fwd"),
                                reason="mmcore._C not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def run_window(q, k, v, dout, sq, sk, left, right, causal, G, scale, softcap, lo, hi, km):
    ops = torch.ops.mmcore_C
    out, lse = ops.window_attention_fwd(q, k, v, sq, sk, left, right, causal, G, scale,
                                        softcap, lo, hi, km)
    grads = ops.window_attention_bwd(dout, q, k, v, out, lse, sq, sk, left, right, causal, G,
                                     scale, softcap, lo, hi, km)
    return (out, lse, *grads)


def check(name, got, mask, q, k, v, dout, scale, softcap):
    """got = (out, lse, dq, dk, dv) against kit's float64 oracle with the tolerance rule."""
    oracle = oracle_attention(q, k, v, mask, scale, dout, softcap or None)
    base = base_attention(q, k, v, mask, scale, dout, softcap or None)
    for what, g, o, b, grad in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, base,
                                   (False, False, True, True, True)):
        assert_close(f"{name} {what}", g, o, b, grad=grad)


def inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Sq, D, generator=g) * amp).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D, generator=g) * amp).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    return q, k, v, dout, g


def lengths(g, B, S, lo):
    return torch.randint(lo, S + 1, (B,), generator=g)


# ------------------------------------------------------------------ softcap (window mode)

# (left, right, causal, G, seqlens, Hq, Hkv)
SOFTCAP_CASES = [
    (-1, -1, False, 0, False, 2, 2),  # softcap alone
    (12, 7, False, 0, False, 4, 2),  # window, GQA
    (-1, -1, True, 0, True, 2, 1),  # causal with lengths, MQA
    (9, 9, True, 5, True, 2, 2),  # causal sliding window + global tokens + lengths
    (20, 0, False, 3, False, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SOFTCAP_CASES)))
def test_softcap_window(dtype, case):
    left, right, causal, G, with_lens, Hq, Hkv = SOFTCAP_CASES[case]
    B, Sq, Sk, D = 2, 83, 97, 24
    q, k, v, dout, g = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=case, amp=2.0)
    sq = lengths(g, B, Sq, 40) if with_lens else None
    sk = lengths(g, B, Sk, 40) if with_lens else None
    scale, softcap = 0.5, 4.0  # scores up to ~20: well inside the cap's bend
    mask = window_mask(B, Sq, Sk, left, right, causal, G, sq, sk)
    got = run_window(q, k, v, dout, sq, sk, left, right, causal, G, scale, softcap, None, None,
                     None)
    check(f"softcap case {case}", got, mask, q, k, v, dout, scale, softcap)


@pytest.mark.parametrize("softcap", (0.5, 30.0, 200.0))
def test_softcap_tanh_accuracy_fp32(softcap):
    """fp32 scores over the whole bend of the cap and past it (the kernel's vectorised tanh is
    built from exp: its absolute error must stay within the tolerance rule at any c)."""
    B, H, S, D = 1, 2, 90, 64
    q, k, v, dout, _ = inputs(B, H, H, S, S, D, torch.float32, seed=13, amp=3.0)
    mask = window_mask(B, S, S, -1, -1, False, 0)
    got = run_window(q, k, v, dout, None, None, -1, -1, False, 0, 1.0, softcap, None, None, None)
    check(f"softcap {softcap}", got, mask, q, k, v, dout, 1.0, softcap)


def test_softcap_changes_the_result():
    """A softcap that bends the scores gives another output than none (the test can fail)."""
    q, k, v, dout, _ = inputs(1, 2, 2, 40, 40, 16, torch.float32, seed=3, amp=2.0)
    a = torch.ops.mmcore_C.window_attention_fwd(q, k, v, None, None, -1, -1, False, 0, 0.5)
    b = torch.ops.mmcore_C.window_attention_fwd(q, k, v, None, None, -1, -1, False, 0, 0.5, 2.0)
    assert (a[0] - b[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_softcap_several_key_chunks(dtype):
    """Sk > 1024: the forward's online softmax and the backward's delta over several chunks."""
    B, Hq, Hkv, Sq, Sk, D = 1, 2, 1, 70, 1100, 16
    q, k, v, dout, _ = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=11, amp=2.0)
    mask = window_mask(B, Sq, Sk, -1, -1, False, 0)
    got = run_window(q, k, v, dout, None, None, -1, -1, False, 0, 0.4, 3.0, None, None, None)
    check("softcap chunks", got, mask, q, k, v, dout, 0.4, 3.0)


# ------------------------------------------------------------------ bounds mode


def random_bounds(g, B, Sq, Sk):
    """lo / hi int32 (B, Sq): random ranges, empty rows (lo >= hi) and values outside [0, Sk]."""
    lo = torch.randint(-10, Sk + 5, (B, Sq), generator=g)
    width = torch.randint(-5, Sk // 2, (B, Sq), generator=g)
    hi = lo + width
    lo[:, ::7] = hi[:, ::7] + 3  # empty rows
    hi[:, 3::11] = Sk + 40  # past the end
    lo[:, 5::13] = -100
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", (False, True), ids=("bounds", "bounds+key_mask"))
def test_bounds_random(dtype, with_mask):
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 130, 121, 32
    q, k, v, dout, g = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=21 + with_mask)
    lo, hi = random_bounds(g, B, Sq, Sk)
    sq, sk = lengths(g, B, Sq, 100), lengths(g, B, Sk, 90)
    km = torch.rand(B, Sk, generator=g) > 0.3 if with_mask else None
    mask = bounds_mask(lo, hi, km, sq, sk, Sk)
    assert (~mask.any(-1)).any() and mask.any(), "the case must have empty and non-empty rows"
    got = run_window(q, k, v, dout, sq, sk, -1, -1, False, 0, 0.3, 0.0, lo, hi, km)
    check(f"bounds mask={with_mask}", got, mask, q, k, v, dout, 0.3, 0.0)
    empty = ~mask[:, 0].any(-1)  # (B, Sq): out 0, lse -inf, zero dq
    assert torch.isneginf(got[1].transpose(0, 1)[:, empty]).all()
    assert (got[0].transpose(0, 1)[:, empty] == 0).all()
    assert (got[2].transpose(0, 1)[:, empty] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_bounds_patterns_with_softcap(dtype):
    """The patterns of issue 26 (prefix-LM, a bidirectional image block in causal text, a
    per-sample image range) in one batch, with a softcap."""
    B, Hq, Hkv, Sq, Sk, D = 3, 2, 2, 96, 96, 16
    q, k, v, dout, g = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=5, amp=1.5)
    i = torch.arange(Sq)
    lo = torch.zeros(B, Sq, dtype=torch.long)
    hi = torch.stack([
        torch.maximum(i + 1, torch.tensor(30)),  # prefix-LM, prefix 30
        i + 1,  # causal, with an image block [40, 70) seen bidirectionally
        torch.full((Sq,), 64),  # every row sees keys [16, 64) (text over one image)
    ])
    blk = (i >= 40) & (i < 70)
    lo[1, blk], hi[1, blk] = 0, 70
    lo[2] = 16
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    mask = bounds_mask(lo, hi, None, None, None, Sk)
    got = run_window(q, k, v, dout, None, None, -1, -1, False, 0, 0.25, 5.0, lo, hi, None)
    check("bounds patterns", got, mask, q, k, v, dout, 0.25, 5.0)


def test_causal_as_bounds_equals_causal():
    """Bounds (0, i + 1) is the causal path: the same keys, the same result."""
    q, k, v, dout, _ = inputs(2, 2, 1, 130, 130, 16, torch.float32, seed=8)
    i = torch.arange(130, dtype=torch.int32)
    lo = torch.zeros(2, 130, dtype=torch.int32)
    hi = (i + 1).expand(2, 130).contiguous()
    a = run_window(q, k, v, dout, None, None, -1, -1, True, 0, 0.3, 0.0, None, None, None)
    b = run_window(q, k, v, dout, None, None, -1, -1, False, 0, 0.3, 0.0, lo, hi, None)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ key_mask (window mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", (0.0, 6.0), ids=("nocap", "cap"))
def test_key_mask_sliding_window(dtype, softcap):
    """Holey and left padding in a causal sliding-window layer (mistral / gemma3): the window
    counts key indices, masked keys (NaN-poisoned here) are never seen, rows whose window holds
    only masked keys give out 0, lse -inf, zero gradients."""
    B, Hq, Hkv, S, D, w = 3, 4, 2, 140, 16, 24
    q, k, v, dout, g = inputs(B, Hq, Hkv, S, S, D, dtype, seed=31, amp=1.5)
    km = torch.ones(B, S, dtype=torch.bool)
    km[0, :37] = False  # left padding
    km[1, 50:90] = False  # a hole longer than the window: some rows see nothing
    km[2] = torch.rand(S, generator=g) > 0.4  # scattered holes
    k[0][:, ~km[0]] = float("nan")  # never read: poison them (sample 0)
    v[0][:, ~km[0]] = float("nan")
    mask = window_mask(B, S, S, w - 1, 0, True, 0) & km[:, None, None, :]
    assert (~mask.any(-1)).any()
    got = run_window(q, k, v, dout, None, None, w - 1, 0, True, 0, 0.25, softcap, None, None, km)
    check(f"key_mask cap={softcap}", got, mask, q, k, v, dout, 0.25, softcap)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_key_mask_globals_lengths(dtype):
    """key_mask with global tokens, a non-causal window and per-sample lengths (bottom-right
    alignment), GQA."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 1, 90, 120, 24
    q, k, v, dout, g = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=41)
    sq, sk = torch.tensor([90, 61]), torch.tensor([120, 77])
    km = torch.rand(B, Sk, generator=g) > 0.25
    km[:, 1] = False  # a masked global key
    mask = window_mask(B, Sq, Sk, 10, 6, False, 4, sq, sk) & km[:, None, None, :]
    got = run_window(q, k, v, dout, sq, sk, 10, 6, False, 4, 0.3, 0.0, None, None, km)
    check("key_mask globals", got, mask, q, k, v, dout, 0.3, 0.0)


def test_key_mask_all_true_is_exact():
    """An all-true key_mask takes the masked code path and changes nothing, bit for bit."""
    q, k, v, dout, _ = inputs(1, 2, 2, 100, 100, 16, torch.float32, seed=2)
    km = torch.ones(1, 100, dtype=torch.bool)
    a = run_window(q, k, v, dout, None, None, 20, 20, False, 2, 0.3, 0.0, None, None, None)
    b = run_window(q, k, v, dout, None, None, 20, 20, False, 2, 0.3, 0.0, None, None, km)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ cross_attention softcap


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_cross_softcap(dtype):
    B, Hq, Hkv, Sq, Sk, D = 3, 4, 2, 70, 45, 32
    q, k, v, dout, g = inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=51, amp=2.0)
    sq, sk = torch.tensor([70, 33, 0]), torch.tensor([45, 1, 20])
    ops = torch.ops.mmcore_C
    out, lse = ops.cross_attention_fwd(q, k, v, sq, sk, 0.4, 3.0)
    grads = ops.cross_attention_bwd(dout, q, k, v, out, lse, sq, sk, 0.4, 3.0)
    mask = window_mask(B, Sq, Sk, -1, -1, False, 0, sq, sk)
    check("cross softcap", (out, lse, *grads), mask, q, k, v, dout, 0.4, 3.0)


# ------------------------------------------------------------------ bad input


def _bad(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_bad_input_names_the_argument():
    q = torch.randn(2, 2, 10, 8)
    k = torch.randn(2, 2, 12, 8)
    ok = torch.zeros(2, 10, dtype=torch.int32)
    f = torch.ops.mmcore_C.window_attention_fwd

    def fwd(**kw):
        a = dict(left=-1, right=-1, causal=False, G=0, softcap=0.0, lo=None, hi=None, km=None)
        a.update(kw)
        return lambda: f(q, k, k, None, None, a["left"], a["right"], a["causal"], a["G"], 0.5,
                         a["softcap"], a["lo"], a["hi"], a["km"])

    _bad(fwd(lo=ok.long(), hi=ok), "key_lo: must be Int")
    _bad(fwd(lo=ok, hi=torch.zeros(2, 11, dtype=torch.int32)), r"key_hi: must have shape \(B, Sq\)")
    _bad(fwd(lo=ok), "key_hi: key_lo and key_hi come together")
    _bad(fwd(hi=ok), "key_lo: key_lo and key_hi come together")
    _bad(fwd(lo=torch.zeros(10, 2, dtype=torch.int32).t(), hi=ok), "key_lo: must be contiguous")
    _bad(fwd(lo=ok, hi=ok, causal=True), "key_lo: bounds mode")
    _bad(fwd(lo=ok, hi=ok, left=4, right=4), "key_lo: bounds mode")
    _bad(fwd(km=torch.ones(2, 12)), "key_mask: must be Bool")
    _bad(fwd(km=torch.ones(2, 10, dtype=torch.bool)), r"key_mask: must have shape \(B, Sk\)")
    _bad(fwd(softcap=-1.0), "softcap: must be a finite float")
    _bad(fwd(softcap=float("inf")), "softcap: must be a finite float")
    bwd = torch.ops.mmcore_C.window_attention_bwd
    out, lse = f(q, k, k, None, None, -1, -1, False, 0, 0.5)
    _bad(lambda: bwd(q, q, k, k, out, lse, None, None, -1, -1, False, 0, 0.5, 0.0, None, None,
                     torch.ones(2, 12, dtype=torch.uint8)), "key_mask: must be Bool")
    _bad(lambda: torch.ops.mmcore_C.cross_attention_fwd(q, k, k, None, None, 0.5, -2.0),
         "softcap: must be a finite float")
    _bad(lambda: torch.ops.mmcore_C.cross_attention_bwd(q, q, k, k, out, lse, None, None, 0.5,
                                                        float("nan")),
         "softcap: must be a finite float")
