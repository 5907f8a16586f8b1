"""Dispatch: the heuristic order per device, measured tables (written by the test), and the
fallback when a backend fails to compile or launch under `auto` (eager, custom op, compile)."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import mmcore
from mmcore.ops import _eager, failures, registry, tables
from mmcore.ops.backends import _loaders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CPP = _loaders.ext_error() is None


@pytest.fixture(autouse=True)
def clean():
    failures.reset()
    tables.use("off")
    yield
    failures.reset()
    tables.use(None)


def P(op, device="cpu", dtype=torch.float32, D=64, grad=False, **extra):
    kw = dict(head_dim=D, needs_grad=grad)
    if op == "window_attention":
        extra = {"Sq": 1024, "Sk": 1024, "window": (64, 64), "causal": False,
                 "aligned": True, **extra}
        kw["global_tokens"] = extra.pop("G", 0)
    elif op == "cross_attention":
        extra = {"Sq": 1024, "Sk": 64, **extra}
    else:
        kw.update(rank=16, adapters=extra.pop("adapters", 1))
        extra = {"M": 512, "N": 768, **extra}
    return registry.Problem(op, device, dtype, extra=extra, **kw)


def order(op, p):
    return [i.backend for i in registry.plan(op, p)[0]]


# ------------------------------------------------------------------ heuristics
def test_cuda_heuristics_prefer_pytorch_kernels():
    """Without a table, CUDA problems go to PyTorch's own kernels first (SDPA, Flex, the
    cuBLAS composition); mmcore's Triton kernels come after them."""
    cross = order("cross_attention", P("cross_attention", "cuda", torch.bfloat16))
    assert cross.index("sdpa") < cross.index("triton")
    band = order("window_attention", P("window_attention", "cuda", torch.bfloat16))
    assert band[0] == "flex" and "sdpa" not in band and band.index("flex") < band.index("triton")
    dense = order("window_attention", P("window_attention", "cuda", torch.bfloat16,
                                        window=(-1, -1)))
    assert dense[:2] == ["sdpa", "flex"]
    lora = order("lora_linear", P("lora_linear", "cuda", torch.bfloat16))
    assert lora[0] == "composed" and lora.index("composed") < lora.index("triton")


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C not built")
def test_cpu_heuristics_prefer_the_cpp_kernels():
    for op in registry.OPS:
        got = order(op, P(op))
        assert got[0] == "cpu" and got[-1] == "torch", (op, got)
        assert "triton" not in got and "flex" not in got  # by name only on the CPU
    assert order("cross_attention", P("cross_attention"))[:2] == ["cpu", "sdpa"]


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C not built")
def test_cpu_full_attention_goes_to_sdpa_past_the_measured_crossover():
    """fp32 full attention on the CPU: SDPA's flash kernels (forward + backward from
    Sk = 256, forward only from Sk = 1024); short sequences, bf16 and real windows stay on
    the C++ kernel (benchmarks/RESULTS.md, the training step)."""
    dense = dict(window=(-1, -1))
    at = lambda S, **kw: order("window_attention", P(  # noqa: E731
        "window_attention", **{"Sq": S, "Sk": S, **dense, **kw}))
    assert at(512, grad=True)[0] == "sdpa"
    assert at(128, grad=True)[0] == "cpu"
    assert at(512)[0] == "cpu" and at(2048)[0] == "sdpa"
    assert at(2048, dtype=torch.bfloat16, grad=True)[0] == "cpu"
    assert at(2048, grad=True, window=(128, 128))[0] == "cpu"  # a real window


# ------------------------------------------------------------------ measured tables
def _table(tmp_path, entries, device=None, torch_v=None, name="t.json"):
    path = str(tmp_path / name)
    tables.write(path, "cpu", entries, grid="test")
    if device or torch_v:
        t = json.load(open(path))
        t["device"] = device or t["device"]
        t["torch"] = torch_v or t["torch"]
        with open(path, "w") as f:
            json.dump(t, f)
    tables.use(tables._OVERRIDE[0])  # reload
    return path


def _entry(p, order_, ms=None):
    return {"kind": tables.kind(p), "sizes": list(tables.sizes(p)), "order": order_,
            "ms": ms or {b: float(n + 1) for n, b in enumerate(order_)}}


def test_table_decides_within_its_bucket(tmp_path):
    p = P("cross_attention")
    tables.use(_table(tmp_path, {"cross_attention": [_entry(p, ["torch", "sdpa"])]}))
    assert order("cross_attention", p)[:2] == ["torch", "sdpa"]
    near = P("cross_attention", Sq=3000, Sk=100)  # within 4x in every size
    assert order("cross_attention", near)[0] == "torch"
    far = P("cross_attention", Sq=65536)  # 64x longer: no measured point covers it
    assert order("cross_attention", far)[0] != "torch"
    other_kind = P("cross_attention", dtype=torch.bfloat16)
    assert order("cross_attention", other_kind)[0] != "torch"
    # the public API follows the table: a call that the table sends to `torch`
    q, k, v = torch.randn(1, 2, 1024, 64), torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    assert registry.dispatch("cross_attention", mmcore.ops.registry.Problem(
        "cross_attention", "cpu", torch.float32, head_dim=64,
        extra={"Sq": 1024, "Sk": 64})) == "auto:" + ",".join(order("cross_attention", p))
    torch.testing.assert_close(mmcore.cross_attention(q, k, v),
                               mmcore.cross_attention(q, k, v, backend="torch"))


def test_table_may_pick_a_backend_auto_excludes(tmp_path):
    """flex is not picked by the CPU heuristics (auto_devices), but a table that measured it
    fastest for a bucket sends that bucket to it."""
    p = P("window_attention", Sq=256, Sk=256, window=(16, 16))
    assert "flex" not in order("window_attention", p)
    tables.use(_table(tmp_path, {"window_attention": [_entry(p, ["flex", "torch"])]}))
    assert order("window_attention", p)[0] == "flex"
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    torch.testing.assert_close(mmcore.window_attention(q, k, v, window=(16, 16)),
                               mmcore.window_attention(q, k, v, window=(16, 16),
                                                       backend="torch"),
                               atol=2e-5, rtol=1e-5)


def test_table_of_another_device_or_stack_is_not_used(tmp_path, monkeypatch):
    p = P("cross_attention")
    monkeypatch.setattr(tables, "TABLE_DIR", str(tmp_path))
    name = tables.device_key("cpu") + ".json"
    entries = {"cross_attention": [_entry(p, ["torch"])]}
    tables.use(None)
    monkeypatch.delenv("MMCORE_DISPATCH_TABLE", raising=False)
    _table(tmp_path, entries, device="Some Other CPU", name=name)
    assert "does not match" in tables.describe("cpu") and "Some Other CPU" in \
        tables.describe("cpu")
    assert order("cross_attention", p)[0] != "torch"
    _table(tmp_path, entries, torch_v="1.0.0", name=name)
    assert "torch '1.0' != " in tables.describe("cpu")
    _table(tmp_path, entries, name=name)
    assert tables.describe("cpu").startswith(os.path.join(str(tmp_path), name))
    assert order("cross_attention", p)[0] == "torch"


def test_dispatch_cost_is_a_cache_hit():
    """The auto order is computed once per problem; later calls are one dict lookup."""
    p = P("window_attention")
    first = registry.plan("window_attention", p)
    assert registry.plan("window_attention", P("window_attention")) is first


# ------------------------------------------------------------------ fallback on failure
class JITFunction:  # what Triton's kernels are; failures.describe reads their names
    def __init__(self, fn):
        self.fn = fn


class Config:
    def __init__(self, **kw):
        self.kwargs, self.num_warps, self.num_stages = kw, 8, 3


def _broken(calls):
    def _fwd_kernel():
        pass

    def launch(self, config):
        raise RuntimeError("PassManager::run failed\n  (MLIR diagnostics ...)")

    def forward(*args):
        calls.append(1)
        launch(JITFunction(_fwd_kernel), Config(BLOCK_M=128, BLOCK_N=64))
    return forward


def _qkv(grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 50, 32, generator=g).requires_grad_(grad) for _ in range(3)]


def _first(op, p):
    return registry.plan(op, p)[0][0]


@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_auto_falls_back_and_remembers(monkeypatch, caplog, path):
    """A backend that raises while compiling/launching under auto: logged once (op, backend,
    kernel, config, Triton version, the error's first line), remembered for the problem, and
    the next backend serves -- on the eager fast path and through the custom op."""
    q, k, v = _qkv()
    kw = dict(window=(5, 5), global_tokens=1)
    impl = _first("window_attention", P("window_attention", D=32, Sq=50, Sk=50, window=(5, 5),
                                        G=1))
    calls = []
    monkeypatch.setattr(impl, "forward", _broken(calls))
    if path == "custom_op":
        monkeypatch.setattr(_eager, "plain", lambda *a: False)
    want = mmcore.window_attention(q, k, v, backend="torch", **kw)
    with caplog.at_level(logging.WARNING, logger="mmcore"):
        got = mmcore.window_attention(q, k, v, **kw)
        again = mmcore.window_attention(q, k, v, **kw)
        other_len = mmcore.window_attention(q[:, :, :20], k[:, :, :30], v[:, :, :30], **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=2e-5, rtol=1e-5)
    assert other_len.shape == (2, 4, 20, 32)
    assert calls == [1], "the failed backend must not be tried again for this problem"
    logs = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(logs) == 1, logs
    msg = logs[0]
    for part in ("window_attention forward", f"backend '{impl.backend}'", "_fwd_kernel",
                 "BLOCK_M=128", "num_warps=8", "PassManager::run failed", "torch "):
        assert part in msg, (part, msg)
    assert "MLIR diagnostics" not in msg  # the first line only
    p = P("window_attention", D=32, Sq=50, Sk=50, window=(5, 5), G=1)
    assert _first("window_attention", p).backend != impl.backend


def test_forced_backend_failure_is_one_clear_error(monkeypatch):
    q, k, v = _qkv()
    impl = registry.get("cross_attention", "sdpa")
    monkeypatch.setattr(impl, "forward", _broken([]))
    with pytest.raises(registry.BackendError) as e:
        mmcore.cross_attention(q, k, v, backend="sdpa")
    msg = str(e.value)
    assert msg.startswith("cross_attention forward: backend 'sdpa' failed in Triton kernel "
                          "_fwd_kernel (config BLOCK_M=128")
    assert "RuntimeError: PassManager::run failed" in msg and "torch " in msg
    assert isinstance(e.value.__cause__, RuntimeError)


def test_backward_failure_falls_back_with_correct_grads(monkeypatch):
    q, k, v = _qkv(grad=True)
    dout = torch.randn(2, 4, 50, 32)
    ref = torch.autograd.grad(mmcore.cross_attention(q, k, v, backend="torch"), (q, k, v), dout)
    impl = _first("cross_attention", P("cross_attention", D=32, Sq=50, Sk=50, grad=True))

    def bad(*a):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(impl, "backward", bad)
    got = torch.autograd.grad(mmcore.cross_attention(q, k, v), (q, k, v), dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fallback_inside_torch_compile(monkeypatch):
    """The auto order is a constant of the compiled graph; the fallback runs inside the
    custom op at run time, so a failing backend does not break a compiled caller."""
    q, k, v = _qkv()
    impl = _first("lora_linear", P("lora_linear", D=8, M=6, N=5, rank=2))
    calls = []
    monkeypatch.setattr(impl, "forward", _broken(calls))
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)

    def f(x):
        return mmcore.lora_linear(x, w, None, a, b, 0.5)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, mmcore.lora_linear(x, w, None, a, b, 0.5,
                                                       backend="torch"))
    assert calls == [1]


def test_every_backend_failing_raises_the_first_error(monkeypatch):
    q, k, v = _qkv()
    for impl in registry.implementations("cross_attention"):
        monkeypatch.setattr(impl, "forward", _broken([]))
    with pytest.raises(RuntimeError, match="PassManager::run failed"):
        mmcore.cross_attention(q, k, v)
    with pytest.raises(registry.BackendError, match="failed earlier for this problem"):
        mmcore.cross_attention(q, k, v)


# ------------------------------------------------------------------ mmcore info
def test_info_shows_the_dispatch_table():
    r = subprocess.run([sys.executable, "-m", "mmcore", "info"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, MMCORE_DISPATCH_TABLE="off"))
    assert r.returncode == 0, r.stderr
    assert "dispatch table (cpu): off" in r.stdout
    for b in ("sdpa", "flex", "composed"):
        assert f"  {b} " in r.stdout


# ------------------------------------------------------------------ mmcore bench --tune
def test_tune_writes_a_table_that_dispatch_follows(tmp_path):
    """benchmarks/tune.py on two small CPU points: every serving backend timed, the table
    written for this device and stack, and auto then takes the measured fastest."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import tune

    pts = [dict(op="cross_attention", dtype=torch.float32, bwd=False, B=1, H=2, Sq=256, Sk=49,
                D=32, lengths=True),
           dict(op="lora_linear", dtype=torch.float32, bwd=True, M=64, K=32, N=48, r=4,
                adapters=2)]
    path = tune.run("cpu", out=str(tmp_path / "cpu.json"), points=pts, log=lambda *a: None,
                    reps=1)
    t = json.load(open(path))
    assert tables.matches(t, "cpu") is None
    cross, lora = t["ops"]["cross_attention"][0], t["ops"]["lora_linear"][0]
    assert {"sdpa", "torch"} <= set(cross["ms"]) and "triton" not in cross["ms"]
    assert {"composed", "torch"} <= set(lora["ms"]) and lora["kind"].endswith("adapters2")
    assert cross["order"] == sorted(cross["ms"], key=cross["ms"].get)
    tables.use(path)
    _, _, p = tune._inputs(pts[0], "cpu")
    assert order("cross_attention", p)[0] == cross["order"][0]
