"""lora_linear's `cpu` (C++) and `triton` kernels against the float64 oracle (the tolerance rule, docs/design.md).

Random cases come from the backends' declarations (kit.lora_cases); the explicit ones pin the
edges: r = 1 and 256, odd K, M = 1, ids with -1, per-sequence ids, 64 distinct adapters,
half dtypes, non-contiguous x, requires_grad per tensor, bad adapter ids.  Triton runs under
the interpreter on the CPU (small shapes); `-m gpu` runs it compiled at real shapes."""
import pytest
import torch

import mmcore
from kit import assert_close, check_lora_case, lora_cases, lora_dense, noncontig, \
    poison_allocator
from mmcore.ops import registry
from mmcore.ops.backends import _loaders

N_CPU = 160
N_TRITON = 36


@pytest.fixture
def cpu_ext():
    why = _loaders.cpp_error("lora_linear_fwd")
    if why:
        pytest.fail(f"cpu backend unavailable: {why}")
    return "cpu"


def _device(backend, interpret_device):
    return interpret_device if backend == "triton" else "cpu"


@pytest.fixture(params=["cpu", "triton"])
def backend(request):
    name = request.param
    if name == "cpu":
        request.getfixturevalue("cpu_ext")
        return name, "cpu"
    return name, request.getfixturevalue("interpret")


# ------------------------------------------------------------------ random matrices


@pytest.mark.parametrize("i", range(N_CPU))
def test_cpu_random(cpu_ext, i):
    c = lora_cases("cpu", 1, seed=7000 + i)[0]
    check_lora_case("cpu", c, "cpu", seed=i)


@pytest.mark.parametrize("i", range(N_TRITON))
def test_triton_random(interpret, i):
    c = lora_cases("triton", 1, seed=8000 + i, max_m=70, max_nk=80)[0]
    check_lora_case("triton", c, interpret, seed=i)


# ------------------------------------------------------------------ explicit edges


def _run(backend, device, M, K, N, r, A=1, dtype=torch.float32, bias=True, ids=None,
         noncontig_x=False, grads=("x", "a", "b"), seed=0, scaling=None, lead=None):
    """lora_linear through mmcore (forced backend) vs the float64 oracle and the base."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    lead = lead or (M,)
    x = mk(*lead, K)
    if noncontig_x:
        x = noncontig(x.reshape(M, K)).reshape(*lead, K) if len(lead) == 1 else x
        assert len(lead) != 1 or not x.is_contiguous()
    w, b = mk(N, K), (mk(N) if bias else None)
    la, lb = mk(A, r, K), mk(A, N, r)
    s = (torch.rand(A, generator=g) + 0.1).to(device) if scaling is None else scaling
    dy = mk(*lead, N)
    x.requires_grad_("x" in grads)
    la.requires_grad_("a" in grads)
    lb.requires_grad_("b" in grads)
    poison_allocator(device)
    y = mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, backend=backend)
    ids_m = None
    if ids is not None:
        ids_m = ids.reshape(-1) if ids.shape == tuple(lead) else \
            ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    s1 = s if isinstance(s, torch.Tensor) else torch.full((A,), float(s))

    def dense(dt, dev):
        xx = x.detach().reshape(M, K).to(dev).requires_grad_(True)
        aa = la.detach().to(dev).requires_grad_(True)
        bb = lb.detach().to(dev).requires_grad_(True)
        yy = lora_dense(xx, w.detach().to(dev), None if b is None else b.to(dev), aa, bb,
                        s1.to(dev), None if ids_m is None else ids_m.to(dev), dt)
        return (yy, *torch.autograd.grad(yy, (xx, aa, bb), dy.reshape(M, N).to(dev).to(dt)))

    ref, base = dense(torch.float64, "cpu"), dense(dtype, device)
    assert_close("y", y.reshape(M, N), ref[0], base[0])
    wanted = [t for t, k in ((x, "x"), (la, "a"), (lb, "b")) if k in grads]
    if wanted:
        got = dict(zip([k for k in ("x", "a", "b") if k in grads],
                       torch.autograd.grad(y, wanted, dy)))
        for k, i, shape in (("x", 1, (M, K)), ("a", 2, la.shape), ("b", 3, lb.shape)):
            if k in got:
                assert_close("d" + k, got[k].reshape(shape), ref[i], base[i], grad=True)
    return y


@pytest.mark.parametrize("r", [1, 3, 64, 100, 256])
def test_rank_edges(backend, r):
    """r = 1 .. 256: the fused-in-K-loop path (r <= 64) and the precomputed-T path."""
    name, dev = backend
    _run(name, dev, M=19, K=37, N=29, r=r)


@pytest.mark.parametrize("K", [1, 7, 33, 97])
def test_odd_k(backend, K):
    name, dev = backend
    _run(name, dev, M=21, K=K, N=18, r=5, bias=K % 2 == 1)


@pytest.mark.parametrize("bias", [True, False])
def test_single_row(backend, bias):
    """M = 1 (decoding), with and without bias."""
    name, dev = backend
    _run(name, dev, M=1, K=40, N=70, r=8, bias=bias)


@pytest.fixture(params=["per-row", "segments"])
def fwd_mode(request, monkeypatch):
    """The triton forward serves few-row multi-adapter batches per row and larger ones by
    SGMV segments: run both on the same (small) inputs."""
    monkeypatch.setenv("MMCORE_LORA_PER_ROW_M", "100000" if request.param == "per-row" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(backend, dtype):
    name, dev = backend
    A = 3
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2] * 5).to(dev)
    _run(name, dev, M=40, K=48, N=36, r=8, A=A, dtype=dtype, ids=ids)


def test_ids_with_base_rows(backend):
    """-1 rows get the base term only; a batch of nothing but -1 rows too."""
    name, dev = backend
    ids = torch.tensor([-1, 0, 1, -1, 1, 1, 0, -1, -1] * 3).to(dev)
    _run(name, dev, M=27, K=30, N=22, r=4, A=2, ids=ids)
    _run(name, dev, M=9, K=30, N=22, r=4, A=2, ids=torch.full((9,), -1).to(dev))


def test_per_sequence_ids(backend):
    name, dev = backend
    ids = torch.tensor([1, -1, 0]).to(dev)
    _run(name, dev, M=3 * 11, K=24, N=20, r=6, A=2, ids=ids, lead=(3, 11))


def test_64_distinct_adapters(backend):
    """64 rows, each its own adapter."""
    name, dev = backend
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(64, generator=g).to(dev)
    _run(name, dev, M=64, K=20, N=24, r=4, A=64, ids=ids, bias=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_forward_modes(interpret, fwd_mode, dtype):
    """Per-row B gather and SGMV segments (one row each, and several rows each)."""
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(5)).to(interpret)
    _run("triton", interpret, M=12, K=20, N=24, r=4, A=12, ids=ids, dtype=dtype,
         grads=())
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2] * 5).to(interpret)
    _run("triton", interpret, M=40, K=48, N=36, r=8, A=3, dtype=dtype, ids=ids, grads=())


def test_noncontiguous_x(backend):
    name, dev = backend
    _run(name, dev, M=25, K=33, N=17, r=5, noncontig_x=True)
    _run(name, dev, M=25, K=33, N=17, r=5, A=2, noncontig_x=True,
         ids=torch.tensor([0, 1, -1, 1, 0] * 5).to(dev))


@pytest.mark.parametrize("grads", [("a", "b"), ("a",), ("b",), ("x",), ()])
def test_need_flags(backend, grads):
    """Only what requires grad is computed: the backend is asked for nothing else, and the
    tensors that do not require grad get no .grad."""
    name, dev = backend
    impl = registry.get("lora_linear", name)
    seen = []
    orig = impl.backward

    def spy(*args):
        seen.append(tuple(args[-3:]))
        out = orig(*args)
        for flag, t in zip(args[-3:], out):
            assert (t is not None) == flag
        return out

    impl.backward = spy
    try:
        _run(name, dev, M=20, K=24, N=16, r=4, A=2, grads=grads,
             ids=torch.tensor([0, 1, -1, 1] * 5).to(dev))
    finally:
        impl.backward = orig
    if grads:
        assert seen == [("x" in grads, "a" in grads, "b" in grads)]
    else:
        assert seen == []  # nothing requires grad: no autograd graph, no backward


def test_need_flags_leave_grads_none(backend):
    name, dev = backend
    x = torch.randn(6, 8, device=dev)
    w = torch.randn(5, 8, device=dev)
    la = torch.randn(2, 8, device=dev, requires_grad=True)
    lb = torch.randn(5, 2, device=dev, requires_grad=True)
    mmcore.lora_linear(x, w, None, la, lb, 0.5, backend=name).sum().backward()
    assert x.grad is None and w.grad is None
    assert la.grad is not None and lb.grad is not None


def test_no_grad_fast_path(backend):
    name, dev = backend
    impl = registry.get("lora_linear", name)
    orig = impl.backward
    impl.backward = lambda *a: (_ for _ in ()).throw(AssertionError("backward called"))
    try:
        x = torch.randn(6, 8, device=dev, requires_grad=True)
        la = torch.randn(2, 8, device=dev, requires_grad=True)
        with torch.no_grad():
            y = mmcore.lora_linear(x, torch.randn(5, 8, device=dev), None, la,
                                   torch.randn(5, 2, device=dev), 0.5, backend=name)
        assert not y.requires_grad
    finally:
        impl.backward = orig


def test_adapter_id_out_of_range(backend):
    name, dev = backend
    x = torch.randn(4, 8, device=dev)
    w = torch.randn(5, 8, device=dev)
    la, lb = torch.randn(2, 3, 8, device=dev), torch.randn(2, 5, 3, device=dev)
    for bad in ([0, 1, 2, 0], [0, -2, 1, 1]):
        with pytest.raises(ValueError, match="adapter_ids"):
            mmcore.lora_linear(x, w, None, la, lb, torch.ones(2, device=dev),
                               adapter_ids=torch.tensor(bad, device=dev), backend=name)


def test_cpp_kernel_checks_ids(cpu_ext):
    """The C++ kernel itself refuses out-of-range ids (also with MMCORE_CHECK=0)."""
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    la, lb = torch.randn(2, 3, 8), torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="adapter_ids"):
        torch.ops.mmcore_C.lora_linear_fwd(x, w, None, la, lb, torch.ones(2),
                                           torch.tensor([0, 1, 5, 0]))


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_cpu_variants(cpu_ext, variant):
    """Each measured single-adapter forward variant (two-pass, aug-K, merged) is correct."""
    g = torch.Generator().manual_seed(variant)
    x, w, b = torch.randn(70, 33, generator=g), torch.randn(41, 33, generator=g), \
        torch.randn(41, generator=g)
    la, lb = torch.randn(1, 6, 33, generator=g), torch.randn(1, 41, 6, generator=g)
    s = torch.tensor([0.7])
    y = torch.ops.mmcore_C.lora_linear_fwd_variant(x, w, b, la, lb, s, variant)
    ref = lora_dense(x.double(), w.double(), b.double(), la.double(), lb.double(), s.double(),
                     None, torch.float64)
    base = lora_dense(x, w, b, la, lb, s, None, torch.float32)
    assert_close("y", y, ref, base)


def test_triton_multi_tile_segments(interpret):
    """Several row tiles per adapter segment, split row reductions, M not a tile multiple."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(-1, 3, (150,), generator=g).to(interpret)
    _run("triton", interpret, M=150, K=40, N=70, r=8, A=3, ids=ids)


def test_triton_regression_rank2_multi_adapter_bf16(interpret):
    """Regression: on an H100 (triton 3.6) the backward's dx kernel hit an illegal address for
    this case (128-row tiles there) while reading B in place as (N, r) rows of r = 2; B is now
    read from an (A, r, N) copy.  Under the interpreter it checks the values; compiled on a
    GPU (`interpret` yields "cuda") it checks the fix."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(-1, 5, (65,), generator=g).to(interpret)
    _run("triton", interpret, M=65, K=38, N=30, r=2, A=5, dtype=torch.bfloat16, ids=ids)


# ------------------------------------------------------------------ GPU, real shapes


def _gpu_case(M, K, N, r, A=1, dtype=torch.bfloat16, ids=None, grads=True, bias=True):
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev).to(dtype)
    w = (torch.randn(N, K, device=dev) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=dev).to(dtype) if bias else None
    la = (torch.randn(A, r, K, device=dev) / K ** 0.5).to(dtype)
    lb = (torch.randn(A, N, r, device=dev) / r ** 0.5).to(dtype)
    s = torch.rand(A, device=dev) + 0.5
    dy = torch.randn(M, N, device=dev).to(dtype)
    for t in (x, la, lb):
        t.requires_grad_(grads)
    y = mmcore.lora_linear(x, w, b, la, lb, s, adapter_ids=ids, backend="triton")

    def dense(dt):  # the oracle in float64 on the GPU (fp64 GEMMs), the base in dtype
        xx, aa, bb = (t.detach().to(dt).requires_grad_(grads) for t in (x, la, lb))
        yy = lora_dense(xx, w.to(dt), None if b is None else b.to(dt), aa, bb, s.to(dt),
                        ids, dt)
        if not grads:
            return (yy,)
        return (yy, *torch.autograd.grad(yy, (xx, aa, bb), dy.to(dt)))

    ref, base = dense(torch.float64), dense(dtype)
    assert_close("y", y, ref[0], base[0])
    if grads:
        for name, got, i in zip(("dx", "dA", "dB"), torch.autograd.grad(y, (x, la, lb), dy),
                                (1, 2, 3)):
            assert_close(name, got, ref[i], base[i], grad=True)


@pytest.mark.gpu
def test_gpu_llama_shape_bf16():
    _gpu_case(8192, 4096, 4096, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 8, 64, 256])
def test_gpu_ranks(r):
    _gpu_case(1000, 768, 3072, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_dtypes(dtype):
    _gpu_case(777, 1000, 1100, 16, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 64])
def test_gpu_decode(M):
    _gpu_case(M, 4096, 4096, 16, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("M,A", [(64, 64), (8192, 64), (4099, 8)])
def test_gpu_multi_adapter(M, A):
    ids = torch.randint(-1, A, (M,), device="cuda")
    _gpu_case(M, 4096, 4096, 16, A=A, ids=ids)


@pytest.mark.gpu
def test_gpu_regression_rank2_multi_adapter_bf16_illegal_address():
    """README "Known issue": on an H100 (triton 3.6) the backward's dx kernel hit an illegal
    memory access (a second run hung) for M=65, K=38, N=30, r=2, A=5 adapters with ids, bf16,
    128-row tiles, while reading B in place as (N, r) rows of r = 2 elements.  B is now read
    from an (A, r, N) copy.  Compiled here, twice (the second run once hung); the watchdog
    (tests/watchdog.py) turns a hang into a failure of this test."""
    for _ in range(2):
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(-1, 5, (65,), generator=g).cuda()
        _run("triton", "cuda", M=65, K=38, N=30, r=2, A=5, dtype=torch.bfloat16, ids=ids)
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_backward_bitwise_deterministic():
    """dA / dB are split-row partials summed in a fixed order (no atomics): bitwise equal
    reruns, multi-adapter with a long segment."""
    torch.manual_seed(1)
    M, K, N, r, A = 5000, 1024, 768, 16, 4
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 32
    la = torch.randn(A, r, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lb = torch.randn(A, N, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.rand(A, device="cuda") + 0.5
    ids = torch.randint(-1, A, (M,), device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def grads():
        y = mmcore.lora_linear(x, w, None, la, lb, s, adapter_ids=ids, backend="triton")
        return torch.autograd.grad(y, (x, la, lb), dy)

    a, b = grads(), grads()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """A real x of 2^31 + 2^22 elements (4 GiB bf16): rows past element 2^31 are checked
    against a float64 oracle of those rows only (the others are the same arithmetic)."""
    M, K, N, r = (2 ** 31 + 2 ** 22) // 4096, 4096, 256, 16
    torch.manual_seed(3)
    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16).normal_()
    w = (torch.randn(N, K, device="cuda") / 64).to(torch.bfloat16)
    la = (torch.randn(r, K, device="cuda") / 64).to(torch.bfloat16)
    lb = (torch.randn(N, r, device="cuda") / 4).to(torch.bfloat16)
    with torch.no_grad():
        y = mmcore.lora_linear(x, w, None, la, lb, 0.5, backend="triton")
    tail = slice(M - 1024, M)  # rows 2^31 / K + ... : past element 2^31 of x
    assert (M - 1024) * K > 2 ** 31
    xs = x[tail]
    ref = lora_dense(xs.double().cpu(), w.double().cpu(), None, la.double().cpu()[None],
                     lb.double().cpu()[None], torch.tensor([0.5]).double(), None, torch.float64)
    base = lora_dense(xs, w, None, la[None], lb[None], torch.tensor([0.5], device="cuda"),
                      None, torch.bfloat16)
    assert_close("y rows past 2^31", y[tail], ref, base)
