"""lora_linear's `cuda` backend: SGMV (csrc/cuda/lora_sgmv.cu) and its adapter grouping.

Without a GPU, mmcore_C::lora_sgmv_fwd / lora_sgmv_plan on CPU tensors run the kernels' CPU
emulation (csrc/cuda/emulation.cpp): the same plan layout, row tiles, K splits, padded ranks
and roundings, checked against the float64 oracle with the tolerance rule (docs/design.md).  `-m gpu` runs the
compiled kernels through mmcore.lora_linear(backend="cuda") and checks the GPU plan (a
one-block counting sort) against the CPU one."""
import math
import random

import pytest
import torch

import mmcore
from kit import assert_close, lora_dense, noncontig
from mmcore.ops.backends import _loaders

BF16, F16 = torch.bfloat16, torch.float16
BLOCK_M = 64  # csrc/cuda/lora_sgmv_plan.h kBlockM

pytestmark = pytest.mark.skipif(_loaders.ext_error() is not None, reason="mmcore._C not built")


def make(M, K, N, r, A, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype).to(device)  # noqa
    x = mk(M, K)
    w = mk(N, K, sc=K ** -0.5)
    b = mk(N) if bias else None
    la = mk(A, r, K, sc=K ** -0.5)
    lb = mk(A, N, r, sc=r ** -0.5)
    s = (torch.rand(A, generator=g) + 0.5).to(device)
    return x, w, b, la, lb, s


def check(y, x, w, b, la, lb, s, ids):
    """y vs the float64 oracle (on x's device: fp64 GEMMs on a GPU) and the dtype base."""
    ref = lora_dense(x, w, b, la, lb, s.double(), ids, torch.float64)
    base = lora_dense(x, w, b, la, lb, s, ids, x.dtype)
    assert_close("y", y, ref, base)


def run(M, K, N, r, A, dtype=BF16, ids=None, ksplits=0, seed=0, bias=True, nc=False):
    x, w, b, la, lb, s = make(M, K, N, r, A, dtype, "cpu", seed, bias)
    if nc:
        x = noncontig(x)
        assert not x.is_contiguous()
    y = torch.ops.mmcore_C.lora_sgmv_fwd(x, w, b, la, lb, s, ids, ksplits)
    check(y, x, w, b, la, lb, s, ids)


# ------------------------------------------------------------------ plan


def reference_plan(ids, A):
    slot = [i + 1 if 0 <= i < A else 0 for i in ids.tolist()]
    cnt = [slot.count(a) for a in range(A + 1)]
    seg = [sum(cnt[:a + 1]) for a in range(A + 1)]
    tiles = [0]
    for a in range(A):
        tiles.append(tiles[-1] + math.ceil(cnt[a + 1] / BLOCK_M))
    perm = sorted(range(len(slot)), key=lambda m: slot[m])  # stable
    return perm, seg, tiles


@pytest.mark.parametrize("M,A,seed", [(1, 1, 0), (200, 5, 1), (1000, 64, 2), (3, 512, 3),
                                      (130, 2, 4), (0, 3, 5)])
def test_plan_matches_reference(M, A, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, A + 2, (M,), generator=g)  # ids >= A count as base only
    perm, seg, tiles = torch.ops.mmcore_C.lora_sgmv_plan(ids, A)
    rp, rs, rt = reference_plan(ids, A)
    assert perm.tolist() == rp and seg.tolist() == rs and tiles.tolist() == rt
    assert perm.dtype == seg.dtype == tiles.dtype == torch.int32


# ------------------------------------------------------------------ CPU emulation vs oracle


@pytest.mark.parametrize("i", range(24))
def test_emulation_random(i):
    """Random shapes, ids, ranks, K splits.  N >= 64: the base GEMM's output is rounded to the
    dtype before the low-rank term is added (it stays cuBLAS), as in the plain PyTorch
    computation, so with a handful of outputs the 2x rule would compare two draws of the same
    rounding error."""
    rng = random.Random(6100 + i)
    A = rng.choice([1, 2, 5, 17])
    M = rng.choice([1, 5, 63, 64, 65, 130, rng.randint(1, 300)])
    ids = None
    if A > 1 or rng.random() < 0.5:
        ids = torch.tensor([rng.randint(-1, A - 1) for _ in range(M)])
    run(M, K=rng.choice([8, 40, 136, 256]), N=rng.choice([64, 66, 130, 258]),
        r=rng.choice([1, 3, 8, 16, 17, 33, 64, 100, 128]), A=A, dtype=rng.choice([BF16, F16]),
        ids=ids, ksplits=rng.choice([0, 1, 2, 5]), seed=i, bias=rng.random() < 0.6,
        nc=rng.random() < 0.3)


def test_emulation_many_adapters_decode():
    """64 adapters, one or two rows each (a decode batch): tiles of one row, K split 4."""
    ids = torch.arange(96) % 64
    ids[::7] = -1
    run(96, 128, 96, 16, 64, ids=ids, ksplits=4)


def test_emulation_single_adapter_large_m_uses_gemms():
    """No ids and M > 64: two cuBLAS-style GEMMs instead of the SGMV kernels (same rule)."""
    run(300, 64, 48, 8, 1, ids=None)


def test_emulation_all_base_rows():
    run(70, 32, 16, 4, 3, ids=torch.full((70,), -1))


@pytest.mark.parametrize("kw,match", [
    (dict(K=12), "K must be a multiple of 8"),
    (dict(N=7), "N must be even"),
    (dict(r=129), "rank must be in"),
    (dict(dtype=torch.float32), "bfloat16 or float16"),
])
def test_errors_name_the_argument(kw, match):
    a = dict(M=4, K=16, N=8, r=4, A=1, dtype=BF16)
    a.update(kw)
    x, w, b, la, lb, s = make(a["M"], a["K"], a["N"], a["r"], a["A"], a["dtype"], "cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmcore_C.lora_sgmv_fwd(x, w, b, la, lb, s, None, 0)


# ------------------------------------------------------------------ GPU: the compiled kernels


def gpu_case(M, K, N, r, A, dtype=BF16, ids=None, bias=True):
    x, w, b, la, lb, s = make(M, K, N, r, A, dtype, "cuda", bias=bias)
    if A == 1 and ids is None:
        la, lb = la[0], lb[0]
        y = mmcore.lora_linear(x, w, b, la, lb, float(s[0]), backend="cuda")
        la, lb, s = la[None], lb[None], s[:1]
    else:
        y = mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, backend="cuda")
    check(y, x, w, b, la, lb, s, ids)


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("M,A", [(64, 64), (8192, 64), (4099, 8), (16, 512), (1000, 1)])
    def test_multi_adapter(self, M, A):
        ids = torch.randint(-1, A, (M,), device="cuda")
        gpu_case(M, 4096, 4096, 16, A, ids=ids)

    @pytest.mark.parametrize("M", [1, 7, 64])
    def test_single_adapter_decode(self, M):
        gpu_case(M, 4096, 4096, 16, 1)

    @pytest.mark.parametrize("r", [1, 8, 33, 64, 128])
    def test_ranks(self, r):
        gpu_case(777, 1000, 1100, r, 4, ids=torch.randint(-1, 4, (777,), device="cuda"))

    def test_fp16_no_bias(self):
        gpu_case(300, 768, 3072, 16, 3, dtype=F16, bias=False,
                 ids=torch.randint(-1, 3, (300,), device="cuda"))

    @pytest.mark.parametrize("M,A", [(1, 1), (5000, 64), (100, 4096), (70000, 7)])
    def test_plan_matches_cpu(self, M, A):
        ids = torch.randint(-1, A + 1, (M,), device="cuda")
        perm, seg, tiles = torch.ops.mmcore_C.lora_sgmv_plan(ids, A)
        cp, cs, ct = torch.ops.mmcore_C.lora_sgmv_plan(ids.cpu(), A)
        assert torch.equal(seg.cpu(), cs) and torch.equal(tiles.cpu(), ct)
        # order inside a segment is free on the GPU (atomics): compare as sets per segment
        bounds = [0] + cs.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            assert sorted(perm[lo:hi].tolist()) == sorted(cp[lo:hi].tolist())
