"""Element offsets past 2^31: every Triton kernel computes addresses in int64.

Offsets that overflow int32 are a recurring bug class in attention and GEMM kernels (STYLE.md).
A tensor with more than 2^31 elements does not fit a CPU test's memory budget, but its
address arithmetic does not need the elements: the inputs here are small views into one
storage of 2^31 + a few thousand elements (allocated lazily, so only the touched pages are
real), laid out so that the third sample / row sits past element 2^31.  A kernel that
multiplied an int32 index by an int32 stride would wrap around and read the wrong memory.
Under the interpreter (CPU CI) the numpy int32 arithmetic wraps exactly as the GPU's would;
`-m gpu` runs the same cases compiled, plus one real tensor of more than 2^31 elements per op.

Before the LoRA kernels took int64 K offsets, dx = dy W with W's rows 2^30 elements apart
computed offs_k * stride in int32 (wrapping for the second row of a K tile)."""
import pytest
import torch

import mmcore
from kit import assert_close, attention_dense, lora_dense, window_mask

BIG = 2 ** 31
F32, BF16 = torch.float32, torch.bfloat16


def _storage(dtype, device, extra):
    """A lazily allocated buffer of BIG + extra elements: only what is written gets memory."""
    return torch.empty(BIG + extra, dtype=dtype, device=device)


def _view(buf, shape, stride, offset, g):
    t = buf.as_strided(shape, stride, offset)
    t.copy_(torch.randn(shape, generator=g).to(buf.dtype))
    return t


def _attention_inputs(dtype, device, H, Hkv, Sq, Sk, D, seed=0):
    """q (3, H, Sq, D) and k, v (3, Hkv, Sk, D), samples 2^30 + 64 elements apart (an int32
    stride): sample 2 starts past element 2^31, so b * stride overflows int32 there."""
    g = torch.Generator().manual_seed(seed)
    per = H * Sq * D + 2 * Hkv * Sk * D  # one sample's q, k and v, back to back
    sb = 2 ** 30 + 64
    buf = _storage(dtype, device, 128 + per)
    q = _view(buf, (3, H, Sq, D), (sb, Sq * D, D, 1), 0, g)
    k = _view(buf, (3, Hkv, Sk, D), (sb, Sk * D, D, 1), H * Sq * D, g)
    v = _view(buf, (3, Hkv, Sk, D), (sb, Sk * D, D, 1), H * Sq * D + Hkv * Sk * D, g)
    assert q.stride(0) < BIG < 2 * q.stride(0)
    return buf, q, k, v


def _check_attention(op, q, k, v, dout, mask, scale, kwargs, device):
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    fn = mmcore.window_attention if op == "window" else mmcore.cross_attention
    out = fn(qg, kg, vg, backend="triton", scale=scale, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    # the oracle and the base on contiguous copies (no large offsets)
    qc, kc, vc = (t.detach().cpu().contiguous() for t in (q, k, v))
    refs, bases = [], []
    for dt, store in ((torch.float64, refs), (q.dtype, bases)):
        a, b, c = (t.to(dt).requires_grad_(True) for t in (qc, kc, vc))
        o, _ = attention_dense(a, b, c, mask, scale, dt)
        store += [o, *torch.autograd.grad(o, (a, b, c), dout.cpu().to(dt))]
    for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), refs, bases):
        assert_close(name, got, r, b, grad=name != "out")
    assert out[2].abs().sum() > 0  # the sample past 2^31 was read


# the interpreter on a CPU machine; compiled with `-m gpu` on a GPU machine
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + \
    ([] if torch.cuda.is_available() else ["cpu"])


@pytest.mark.parametrize("device", DEVICES)
def test_window_attention_offsets_past_2_31(interpret, device):
    B, H, Hkv, S, D = 3, 2, 1, 24, 16
    buf, q, k, v = _attention_inputs(BF16, device, H, Hkv, S, S, D)
    dout = torch.randn(B, H, S, D).to(BF16).to(device)
    mask = window_mask(B, S, S, 5, 3, False, 2)
    _check_attention("window", q, k, v, dout, mask, D ** -0.5,
                     dict(window=(5, 3), global_tokens=2), device)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_offsets_past_2_31(interpret, device):
    B, H, Hkv, Sq, Sk, D = 3, 2, 2, 20, 9, 16
    buf, q, k, v = _attention_inputs(F32, device, H, Hkv, Sq, Sk, D, seed=1)
    dout = torch.randn(B, H, Sq, D).to(device)
    mask = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    _check_attention("cross", q, k, v, dout, mask, D ** -0.5, {}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_offsets_past_2_31(interpret, device):
    """x's rows and W's rows 2^30 elements apart: row 2 of x and row 2 of W sit past 2^31
    (forward reads W transposed, dx = dy W walks W's rows in the K loop)."""
    M, K, N, r = 3, 40, 3, 4
    g = torch.Generator().manual_seed(2)
    rs = 2 ** 30
    buf = _storage(F32, device, 2 * K + 64)
    x = _view(buf, (M, K), (rs, 1), 0, g)
    w = _view(buf, (N, K), (rs, 1), K + 16, g)
    assert (M - 1) * rs + K > BIG
    la = torch.randn(r, K, generator=g).to(device)
    lb = torch.randn(N, r, generator=g).to(device)
    dy = torch.randn(M, N, generator=g).to(device)
    xg, ag, bg = (t.detach().requires_grad_(True) for t in (x, la, lb))
    y = mmcore.lora_linear(xg, w, None, ag, bg, 0.5, backend="triton")
    grads = torch.autograd.grad(y, (xg, ag, bg), dy)
    wc = w.detach().cpu().contiguous()
    refs, bases = [], []
    for dt, store in ((torch.float64, refs), (F32, bases)):
        xx, aa, bb = (t.detach().cpu().contiguous().to(dt).requires_grad_(True)
                      for t in (x, la, lb))
        yy = lora_dense(xx, wc.to(dt), None, aa[None], bb[None], torch.tensor([0.5]), None, dt)
        store += [yy, *torch.autograd.grad(yy, (xx, aa, bb), dy.cpu().to(dt))]
    for name, got, ref, base in zip(("y", "dx", "dA", "dB"), (y, *grads), refs, bases):
        assert_close(name, got, ref, base, grad=name != "y")


# ------------------------------------------------------------ compiled: real tensors > 2^31

def _tail_oracle(q, k, v, dout, mask, scale):
    """(out, dq, dk, dv) in float64 and in q's dtype (the base) on CPU copies."""
    res = []
    for dt in (torch.float64, q.dtype):
        a, b, c = (t.detach().cpu().to(dt).requires_grad_(True) for t in (q, k, v))
        o, _ = attention_dense(a, b, c, mask, scale, dt)
        res.append([o, *torch.autograd.grad(o, (a, b, c), dout.cpu().to(dt))])
    return res


@pytest.mark.gpu
def test_gpu_window_attention_tensor_past_2_31():
    """q, k, v of 2^31 elements each (1 x 16 x 2^19 x 256 bf16), causal window 64: the last
    rows (past element 2^31 of every tensor) against an oracle of those rows."""
    H, S, D, W, T = 16, 2 ** 19, 256, 64, 192
    torch.manual_seed(5)
    q, k, v = (torch.empty(1, H, S, D, device="cuda", dtype=BF16).normal_()
               for _ in range(3))
    assert q.numel() >= BIG
    qg, kg, vg = (t.requires_grad_(True) for t in (q, k, v))
    out = mmcore.window_attention(qg, kg, vg, window=(W, 0), causal=True, backend="triton")
    dout = torch.zeros_like(out)
    dout[:, -1:, S - T:].normal_()
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    h = slice(H - 1, H)
    qt, kt, vt = q[:, h, S - T:], k[:, h, S - T - W:], v[:, h, S - T - W:]
    mask = window_mask(1, T, T + W, W, 0, True, 0)
    ref, base = _tail_oracle(qt, kt, vt, dout[:, h, S - T:], mask, D ** -0.5)
    got = [out[:, h, S - T:], dq[:, h, S - T:], dk[:, h, S - T:], dv[:, h, S - T:]]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        r, b = (ref[i], base[i]) if i in (0, 1) else (ref[i][:, :, W:], base[i][:, :, W:])
        assert_close(name, got[i], r, b, grad=i > 0)


@pytest.mark.gpu
def test_gpu_cross_attention_tensor_past_2_31():
    """q of 2^31 elements (1 x 16 x 2^19 x 256 bf16) over 197 image tokens: the last rows'
    out and dq against an oracle of those rows."""
    H, Sq, Sk, D, T = 16, 2 ** 19, 197, 256, 256
    torch.manual_seed(6)
    q = torch.empty(1, H, Sq, D, device="cuda", dtype=BF16).normal_().requires_grad_(True)
    k = torch.randn(1, H, Sk, D, device="cuda", dtype=BF16, requires_grad=True)
    v = torch.randn(1, H, Sk, D, device="cuda", dtype=BF16, requires_grad=True)
    out = mmcore.cross_attention(q, k, v, backend="triton")
    dout = torch.zeros_like(out)
    dout[:, -1:, Sq - T:].normal_()
    (dq,) = torch.autograd.grad(out, (q,), dout)
    h = slice(H - 1, H)
    mask = torch.ones(1, 1, T, Sk, dtype=torch.bool)
    ref, base = _tail_oracle(q[:, h, Sq - T:], k[:, h], v[:, h], dout[:, h, Sq - T:], mask,
                             D ** -0.5)
    assert_close("out", out[:, h, Sq - T:], ref[0], base[0])
    assert_close("dq", dq[:, h, Sq - T:], ref[1], base[1], grad=True)
