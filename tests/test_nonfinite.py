"""Issue 16, item 8: a non-finite input reaches exactly the rows that see it (docs/design.md).

Every backend on the CPU (torch, cpu, triton under the interpreter), window and cross
attention, forward and backward.  The expected result is a float64 oracle that sums each row
over its allowed keys only (`where`, never 0 * NaN); finite entries must also agree with the
dense oracle on the same inputs with the bad value zeroed, within the tolerance rule."""
import math

import pytest
import torch

import mmcore
import kit
from kit import attention_dense, window_mask

BACKENDS = ("torch", "cpu", "triton")
NAN, INF = float("nan"), float("inf")
# numpy (the Triton interpreter) warns on inf - inf; that is the arithmetic under test
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def oracle(q, k, v, mask, scale):
    """float64 forward with IEEE rules per row: softmax over the allowed keys (max-subtracted),
    out_i = sum_j where(allowed_ij, p_ij v_j, 0) / l_i; lse NaN / +inf / -inf as it falls."""
    g = q.shape[1] // k.shape[1]
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -INF)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(m == -INF, torch.zeros_like(m), m))
    l = p.sum(-1, keepdim=True)
    terms = torch.where(mask[..., None], p[..., None] * v[:, :, None], torch.zeros(()).double())
    out = torch.where(l == 0, torch.zeros(()).double(), terms.sum(-2) / l)
    lse = torch.where(m == INF, m, m + torch.log(l))[..., 0]
    return out, lse


def inputs(seed=0, B=1, Hq=2, Hkv=1, S=24, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    k[..., 0] = k[..., 0].abs() + 0.1  # so that q[..., 0] = +-inf gives +-inf scores
    return q, k, v


def same_nonfinite(name, got, want):
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{name}: NaN at {torch.isnan(got).nonzero().tolist()}, expected at " \
        f"{torch.isnan(want).nonzero().tolist()}"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: inf pattern differs"
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)]), f"{name}: inf signs"


def close_where_finite(name, got, ref, base, finite, grad=False):
    """The tolerance rule restricted to the entries expected finite."""
    dtype = got.dtype
    got, ref, base = (t.detach().double()[finite] for t in (got, ref, base))
    assert torch.isfinite(got).all(), f"{name}: non-finite where a finite value is expected"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    berr = (base - ref).abs().max().item() if got.numel() else 0.0
    tol = kit.tolerance(berr, ref.abs().max().item() if got.numel() else 0.0, dtype, grad)
    assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e}"


# name -> (tensor to corrupt, index, value); window (2, 1): every row sees 3 or 4 keys
CORRUPT = {
    "nan_value_row": ("v", (0, 0, 6), NAN),
    "nan_value_element": ("v", (0, 0, 6, 3), NAN),
    "inf_value_element": ("v", (0, 0, 6, 3), INF),
    "nan_key_row": ("k", (0, 0, 6), NAN),
    "nan_query_row": ("q", (0, 1, 4), NAN),
    "posinf_scores": ("q", (0, 0, 4, 0), INF),
    "neginf_scores": ("q", (0, 0, 4, 0), -INF),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_nonfinite_reaches_only_the_rows_that_see_it(backend, case):
    """Issue 16, item 8: with window=(2, 1) a NaN / inf planted in one value, key or query
    reaches only the rows whose window holds it -- the others stay equal to the reference.
    At 34b1b06 a NaN value row turned every row NaN (0 * NaN through masked keys), a NaN
    query row gave 0 with lse -inf on cpu / triton, and a +inf score gave 0 on torch."""
    q, k, v = inputs()
    which, idx, val = CORRUPT[case]
    t = {"q": q, "k": k, "v": v}
    t[which][idx] = val
    window, scale = (2, 1), 0.25
    mask = window_mask(1, 24, 24, *window, False, 0)
    want, want_lse = oracle(q, k, v, mask, scale)
    out, lse = mmcore.window_attention(q, k, v, window=window, scale=scale, return_lse=True,
                                       backend=backend)
    same_nonfinite("out", out, want)
    same_nonfinite("lse", lse, want_lse)
    fin = torch.isfinite(want)
    assert torch.allclose(out.double()[fin], want[fin], atol=1e-5, rtol=1e-5)
    lfin = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[lfin], want_lse[lfin], atol=1e-5, rtol=1e-5)


GRAD_CASES = ("nan_value_row", "nan_key_row", "nan_query_row")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_nonfinite_gradients_reach_only_what_the_rows_see(backend, case):
    """Issue 16, item 8 (backward): the rows R that see a NaN key / value (or are a NaN
    query) get NaN dq; the keys those rows see get NaN dk (and NaN dv unless the NaN is in
    v); every other gradient equals the reference on the same inputs with the NaN zeroed."""
    q, k, v = inputs(1)
    which, idx, val = CORRUPT[case]
    clean = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    bad = {n: t.clone() for n, t in clean.items()}
    bad[which][idx] = val
    clean[which][idx] = 0.0
    window, scale = (2, 1), 0.25
    mask = window_mask(1, 24, 24, *window, False, 0)  # (1, 1, Sq, Sk)
    j = idx[2]
    rows = mask[0, 0, :, j] if which in "kv" else torch.arange(24) == j  # R
    keys = mask[0, 0][rows].any(0)  # keys seen by R
    dout = torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(5))
    qb, kb, vb = (t.requires_grad_() for t in (bad["q"], bad["k"], bad["v"]))
    out = mmcore.window_attention(qb, kb, vb, window=window, scale=scale, backend=backend)
    out.backward(dout)
    ref = [t.double().requires_grad_() for t in (clean["q"], clean["k"], clean["v"])]
    o_ref, _ = attention_dense(*ref, mask, scale, torch.float64)
    g_ref = torch.autograd.grad(o_ref, ref, dout.double())
    base = [t.clone().requires_grad_() for t in (clean["q"], clean["k"], clean["v"])]
    o_base, _ = attention_dense(*base, mask, scale, torch.float32)
    g_base = torch.autograd.grad(o_base, base, dout)
    nan_q = rows[None, None, :, None].expand_as(q).clone()
    if which == "q":  # only the corrupted head's row
        nan_q[:, [h for h in range(q.shape[1]) if h != idx[1]]] = False
    nan_k = keys[None, None, :, None].expand_as(k)
    nan_v = nan_k if which != "v" else torch.zeros_like(nan_k)
    for name, got, want_nan, r, b in zip(("dq", "dk", "dv"), (qb.grad, kb.grad, vb.grad),
                                         (nan_q, nan_k, nan_v), g_ref, g_base):
        if backend == "triton" and which == "q" and name != "dq":
            # the known limit (README, "NaN and Inf"): triton's dK/dV kernel has no register
            # left on sm_90 to keep a non-finite query row out of its dots, so the other keys
            # of that row's key blocks may turn NaN too; the keys it sees must be NaN
            assert torch.isnan(got)[want_nan].all(), f"{name}: a key the NaN row sees is not NaN"
            close_where_finite(name, got, r, b, ~torch.isnan(got), grad=True)
            continue
        assert torch.equal(torch.isnan(got), want_nan), \
            f"{name}: NaN at {torch.isnan(got).any(-1).nonzero().tolist()}"
        close_where_finite(name, got, r, b, ~want_nan, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_nonfinite(backend):
    """Issue 16, item 8 (cross attention): a NaN query row gives that row NaN and lse NaN
    (it gave 0 and -inf on cpu and triton), a +inf score gives NaN with lse +inf, and a NaN
    in the padding keys of a sample (j >= Lk) reaches nothing."""
    q, k, v = inputs(2, B=2, Hq=2, Hkv=2, S=12)
    sk = torch.tensor([7, 12])
    q[0, 1, 3] = NAN
    q[1, 0, 5, 0] = INF
    v[0, :, 9] = NAN  # padding of sample 0
    mask = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    mask[0, :, :, :7] = True
    mask[1] = True
    want, want_lse = oracle(q, k, v, mask, 0.3)
    out, lse = mmcore.cross_attention(q, k, v, seqlens_k=sk, scale=0.3, return_lse=True,
                                      backend=backend)
    same_nonfinite("out", out, want)
    same_nonfinite("lse", lse, want_lse)
    assert math.isnan(lse[0, 1, 3]) and lse[1, 0, 5] == INF
    fin = torch.isfinite(want)
    assert torch.allclose(out.double()[fin], want[fin], atol=1e-5, rtol=1e-5)
