"""cross_attention on the `cpu` (C++) and `triton` backends against the float64 oracle.

Random matrix from the backends' declarations (kit.attention_cases) plus named edge cases:
mixed per-sample lengths, zero-length samples (Lk = 0 and Lq = 0), Sk = 1, Sk = block ± 1,
odd head dims up to 256, non-contiguous inputs and grads, GQA, 16-bit dtypes.  Triton runs
under TRITON_INTERPRET=1 here (small shapes) and compiled on a GPU."""
import pytest
import torch

import mmcore
from gpu_cases import CROSS_FAMILIES, cross_cases
from kit import attention_cases, check_attention_case, make_attention_inputs
from mmcore.ops.backends import _loaders

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

N_CPU = 160
N_TRITON = 40
# the interpreter pays per tile op: keep its random matrix to head dims <= 96 (the named cases
# below cover 128 and 256)
TRITON_DIMS = (16, 32, 40, 64, 72, 80, 96)


def _cpu_ok():
    why = _loaders.cpp_error("cross_attention_fwd")
    if why:
        pytest.fail(f"cpu backend unavailable: {why}")
    return "cpu"


@pytest.fixture
def cpu():
    yield _cpu_ok()


def case(**kw):
    c = dict(B=2, Hq=2, Hkv=1, Sq=40, Sk=33, D=32, dtype=F32, noncontig=False, scale=None,
             window=None, causal=False, G=0, seqlens_q=None, seqlens_k=None)
    c.update(kw)
    for n in ("seqlens_q", "seqlens_k"):
        if isinstance(c[n], list):
            c[n] = torch.tensor(c[n])
    return c


# a sample per row: mixed lengths, zero-length keys (image-less sample), zero-length queries
EDGE = {
    "mixed_lengths": case(B=3, Sq=45, Sk=37, seqlens_q=[45, 13, 30], seqlens_k=[37, 5, 20]),
    "lk_zero": case(B=3, Sq=20, Sk=17, seqlens_k=[17, 0, 3]),
    "lq_zero": case(B=3, Sq=20, Sk=17, seqlens_q=[0, 20, 7], seqlens_k=[17, 9, 0]),
    "all_empty": case(B=2, Sq=9, Sk=5, seqlens_q=[0, 3], seqlens_k=[2, 0]),
    "sk_1": case(Sq=35, Sk=1),
    "sk_1_lengths": case(B=3, Sq=35, Sk=4, seqlens_k=[1, 4, 1], dtype=BF16),
    "sq_1": case(Sq=1, Sk=50, seqlens_k=[50, 7]),
    "gqa_3": case(Hq=6, Hkv=2, Sq=33, Sk=49, seqlens_k=[49, 21]),
    "mqa_4": case(Hq=4, Hkv=1, Sq=20, Sk=50, dtype=F16, seqlens_q=[20, 11]),
    "noncontig": case(Hq=4, Hkv=2, Sq=37, Sk=29, noncontig=True, seqlens_k=[29, 10]),
    "noncontig_bf16": case(Hq=2, Hkv=2, Sq=37, Sk=50, noncontig=True, dtype=BF16),
    "fp16": case(Sq=40, Sk=50, dtype=F16, seqlens_k=[50, 33]),
    "bf16": case(Sq=40, Sk=50, dtype=BF16, seqlens_q=[40, 2]),
    "scale": case(Sq=17, Sk=20, scale=0.9),
}


def _run(backend, c, device, seed=0):
    check_attention_case("cross_attention", backend, c, device, seed=seed)


# ------------------------------------------------------------------ cpu (C++)


@pytest.mark.parametrize("i", range(N_CPU))
def test_cpu_random(cpu, i):
    c = attention_cases("cross_attention", "cpu", 1, seed=4000 + i)[0]
    _run("cpu", c, "cpu", seed=i)


@pytest.mark.parametrize("name", sorted(EDGE))
def test_cpu_edge(cpu, name):
    _run("cpu", EDGE[name], "cpu")


@pytest.mark.parametrize("seed", [4, 5, 8, 13])
def test_cpu_fp16_large_logits_backward(cpu, seed):
    """fp16 at scale 40 (logits in the hundreds: P nearly one-hot, dP - delta a near
    cancellation).  delta taken as rowsum(dO * O) from the fp16-rounded output put dQ past the
    tolerance rule in 81 of 160 such draws (these seeds among them; found by the ops fuzzer at
    MMCORE_FUZZ_SCALE=5); from rowsum(P * dP) in fp32, 1 of 160, just past it."""
    _run("cpu", case(Sq=1, Sk=9, D=17, Hq=2, Hkv=2, dtype=F16, scale=40.0, seqlens_k=[2, 9]),
         "cpu", seed=seed)


@pytest.mark.parametrize("D", [40, 72, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cpu_head_dims(cpu, D, dtype):
    _run("cpu", case(Sq=29, Sk=50, D=D, dtype=dtype, seqlens_k=[50, 13]), "cpu")


@pytest.mark.parametrize("Sk", [63, 64, 65, 127, 129, 577])
def test_cpu_sk_blocks(cpu, Sk):
    _run("cpu", case(B=2, Hq=4, Hkv=2, Sq=70, Sk=Sk, D=64, seqlens_k=[Sk, Sk // 2 + 1]), "cpu")


def test_cpu_gqa_many_kv_heads(cpu):
    """Hkv >= threads: the g query heads of a group are stacked along the sequence."""
    _run("cpu", case(B=2, Hq=8, Hkv=4, Sq=30, Sk=20, seqlens_q=[30, 9], seqlens_k=[3, 20]),
         "cpu")


def test_cpu_bad_input(cpu):
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="seqlens_k"):
        mmcore.cross_attention(q, k, k, seqlens_k=torch.tensor([4]), backend="cpu")
    with pytest.raises(TypeError, match="k has dtype"):
        mmcore.cross_attention(q, k.double(), k, backend="cpu")
    with pytest.raises(RuntimeError, match="seqlens_q"):
        torch.ops.mmcore_C.cross_attention_fwd(q, k, k, torch.tensor([9]), None, 0.3)


# ------------------------------------------------------------------ triton


@pytest.mark.parametrize("i", range(N_TRITON))
def test_triton_random(interpret, i):
    c = attention_cases("cross_attention", "triton", 1, seed=5000 + i, max_s=100,
                        dims=TRITON_DIMS)[0]
    _run("triton", c, interpret, seed=i)


@pytest.mark.parametrize("name", sorted(EDGE))
def test_triton_edge(interpret, name):
    _run("triton", EDGE[name], interpret)


@pytest.mark.parametrize("D", [40, 72, 80, 96, 128, 256])
def test_triton_head_dims(interpret, D):
    dt = BF16 if D in (72, 256) else F32
    _run("triton", case(B=2, Hq=1, Hkv=1, Sq=20, Sk=35, D=D, dtype=dt, seqlens_k=[35, 6]),
         interpret)


def _sk_blocks():
    # block ± 1 of the tiles in use: 32 under the interpreter; 64 / 128 compiled
    return [31, 32, 33] if not torch.cuda.is_available() else [63, 65, 127, 129]


@pytest.mark.parametrize("Sk", _sk_blocks())
def test_triton_sk_blocks(interpret, Sk):
    _run("triton", case(B=2, Hq=2, Hkv=1, Sq=40, Sk=Sk, D=16, seqlens_k=[Sk, Sk - 2]),
         interpret)


def test_triton_dkdv_deterministic(interpret):
    """dK/dV over a GQA group and query splits are summed in a fixed order: bitwise equal."""
    c = case(B=2, Hq=4, Hkv=2, Sq=70, Sk=20, D=16, seqlens_q=[70, 50])
    q, k, v, dout = make_attention_inputs(c, interpret)
    sq = c["seqlens_q"].to(interpret)

    def grads():
        out = mmcore.cross_attention(q, k, v, seqlens_q=sq, backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)
    dq1, dk1, dv1 = grads()
    dq2, dk2, dv2 = grads()
    assert not any(t.isnan().any() for t in (dq1, dk1, dv1))
    assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2) and torch.equal(dq1, dq2)


def test_auto_prefers_cpu_on_cpu(cpu):
    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 1, 3, 16)
    p = mmcore.ops.registry.Problem("cross_attention", "cpu", F32, head_dim=16)
    assert mmcore.ops.registry.select("cross_attention", p).backend == "cpu"
    torch.testing.assert_close(mmcore.cross_attention(q, k, k),
                               mmcore.cross_attention(q, k, k, backend="torch"))


# ------------------------------------------------------------------ GPU (compiled Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("Sk", [50, 197, 257, 577, 1025])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_shapes(Sk, D):
    c = case(B=3, Hq=4, Hkv=2, Sq=1000, Sk=Sk, D=D, dtype=BF16,
             seqlens_q=[1000, 517, 0], seqlens_k=[Sk, Sk // 3, Sk])
    _run("triton", c, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 72, 80, 96, 256])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gpu_head_dims(D, dtype):
    """Odd head dims, fp16 and fp32.  [dtype1-40] (fp32, D = 40) once never returned on an
    H200 (issue 11): the fp32 configs were the 16-bit ones -- FMA tiles up to 128 x 128 that
    spilled 5-18 KB of registers per thread -- and the autotuner compiled and timed all 21 of
    them (about 200 s of compiling).  fp32 now has its own small tiles (no spills) and tests
    run without autotuning (one compile per kernel)."""
    c = case(B=2, Hq=2, Hkv=1, Sq=300, Sk=197, D=D, dtype=dtype, noncontig=True,
             seqlens_k=[197, 60])
    _run("triton", c, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fam", CROSS_FAMILIES, ids=[f[0] for f in CROSS_FAMILIES])
def test_gpu_random(fam):
    """The random oracle matrix, three cases per compile family (gpu_cases.py)."""
    for i, c in enumerate(cross_cases(fam, 3, seed=6000 + CROSS_FAMILIES.index(fam))):
        _run("triton", c, "cuda", seed=i)


@pytest.mark.gpu
def test_gpu_backward_bitwise_deterministic():
    """dK/dV summed over GQA heads and query splits in a fixed order: two runs bitwise equal
    (long Sq: several splits on the device)."""
    c = case(B=2, Hq=8, Hkv=2, Sq=4000, Sk=577, D=128, dtype=BF16, seqlens_q=[4000, 2500],
             seqlens_k=[577, 300])
    q, k, v, dout = make_attention_inputs(c, "cuda")
    sq, sk = c["seqlens_q"].cuda(), c["seqlens_k"].cuda()

    def grads():
        out = mmcore.cross_attention(q, k, v, seqlens_q=sq, seqlens_k=sk, backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)

    a, b = grads(), grads()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
