"""Compile mmcore's Triton launches for Hopper (sm_90) on a machine without a GPU.

No kernel runs: the launchers in kernels/ are called with CPU tensors of real shapes while
``JITFunction.run`` and ``Autotuner.run`` are replaced, so that each launch -- each config the
autotuner would try, after its prune -- is specialised as the JIT would (ints equal to 1 become
constants, ints and pointers divisible by 16 get the divisibility hint), compiled by Triton's
own ptxas for sm_90, and reported:

    regs    registers per thread (255 = the cap)
    stack   bytes of local memory per thread: register spills, to be 0 on the hot paths
    smem    shared memory per block (the H100 / H200 give a block at most 227 KB)
    wgmma   Hopper tensor-core instructions in the PTX (0: mma.sync or FMA only)

    python benchmarks/sm90_audit.py [lora|window|cross ...] [--json out.json]

Takes minutes (one ptxas run per config).  Run it with TRITON_INTERPRET unset: kernels
decorated under the interpreter cannot be compiled.  tests/test_sm90_audit.py runs the
``--smoke`` subset (one config per hot kernel) and checks it for spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

SMEM_LIMIT = 227 * 1024
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}
_BLOCK_KEYS = ("BLOCK", "NUM_SPLITS", "M_BLOCKS", "SPLIT", "GROUP_M", "SINGLE", "FUSE_T",
               "PER_ROW", "HAS_MAP")


def _jit_fn(fn):
    while isinstance(fn, Autotuner) or not hasattr(fn, "arg_names"):
        fn = fn.fn
    return fn


def _specialise(fn, args, kwargs):
    """-> (signature, constants, names with the divisibility-16 hint), as the JIT would."""
    bound = dict(zip(fn.arg_names, args))
    dns = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
    sig, consts, div = {}, {}, []
    for p in fn.params:
        v = bound[p.name] if p.name in bound else kwargs.get(p.name, p.default)
        if p.is_constexpr or v is None:
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                div.append(p.name)
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if p.name not in dns and v == 1:
                consts[p.name] = 1
                continue
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if p.name not in dns and v % 16 == 0:
                div.append(p.name)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{p.name}: cannot specialise {type(v).__name__}")
    for n in sig:
        consts.pop(n, None)
    return {**sig, **{n: "constexpr" for n in consts}}, consts, div


def compile_sm90(fn, args, kwargs, num_warps=4, num_stages=3):
    """Compile one launch for sm_90 -> report dict (see the module docstring)."""
    fn = _jit_fn(fn)
    sig, consts, div = _specialise(fn, args, kwargs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    full = {n: sig[n] for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    import triton.backends.nvidia as nv
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                               capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    blocks = {n: v for n, v in consts.items() if n.startswith(_BLOCK_KEYS)}
    return dict(kernel=fn.__name__, config=blocks, num_warps=num_warps, num_stages=num_stages,
                regs=int(m.group(1)), stack=int(m.group(2)), smem=int(k.metadata.shared),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)))


class Intercept:
    """Within ``with Intercept(label) as rec:`` Triton launches are compiled for sm_90, not
    run; rec.reports collects one dict per distinct (kernel, specialisation, config).
    first_config_only: compile only the first config the autotuner keeps after pruning."""

    def __init__(self, first_config_only=False, on_report=None):
        self.reports, self.label, self._seen = [], "", set()
        self.first_only, self.on_report = first_config_only, on_report

    def __enter__(self):
        self._saved = JITFunction.run, Autotuner.run
        rec = self

        def jit_run(fn, *args, grid, warmup=False, **kwargs):
            nw, ns = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
            kwargs.pop("num_ctas", None)
            key = (fn.__name__, repr(_specialise(fn, args, kwargs)), nw, ns)
            if key not in rec._seen:
                rec._seen.add(key)
                try:
                    r = compile_sm90(fn, args, kwargs, nw, ns)
                except Exception as e:  # reported, not raised: the audit goes on
                    r = dict(kernel=fn.__name__, error=f"{type(e).__name__}: {e}"[:300])
                r["case"] = rec.label
                rec.reports.append(r)
                if rec.on_report:
                    rec.on_report(r)

        def auto_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            for c in configs[:1] if rec.first_only else configs:
                tuner.fn.run(*args, **kwargs, **c.all_kwargs())

        JITFunction.run, Autotuner.run = jit_run, auto_run
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._saved
        return False


# ----------------------------------------------------------------- the launches audited


def _lora(rec, smoke):
    from mmcore.kernels import lora_linear as L
    bf = torch.bfloat16
    shapes = [(8192, 4096, 4096, 16, bf)]
    if not smoke:
        shapes += [(8192, 4096, 4096, 128, bf), (2048, 768, 3072, 16, torch.float32)]
    for M, K, N, r, dt in shapes:
        x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
        a, b, s = torch.randn(1, r, K, dtype=dt), torch.randn(1, N, r, dtype=dt), torch.ones(1)
        rec.label = f"lora fwd M={M} {K}->{N} r={r} {dt}"
        L.lora_forward(x, w, None, a, b, s, None)
        rec.label = f"lora bwd M={M} {K}->{N} r={r} {dt}"
        L.lora_backward(x.new_empty(M, N), x, w, a, b, s, None, True, not smoke, not smoke)
    if not smoke:
        a, b, s = torch.randn(8, 16, 4096, dtype=bf), torch.randn(8, 4096, 16, dtype=bf), torch.ones(8)
        x, w = torch.randn(8192, 4096, dtype=bf), torch.randn(4096, 4096, dtype=bf)
        ids = torch.randint(-1, 8, (8192,))
        rec.label = "lora fwd 8 adapters M=8192"
        L.lora_forward(x, w, None, a, b, s, ids)
        rec.label = "lora fwd per-row adapters M=64"
        L.lora_forward(x[:64], w, None, a, b, s, ids[:64])


def _window(rec, smoke):
    from mmcore.kernels import window_attention as W
    dts = (torch.bfloat16,) if smoke else (torch.bfloat16, torch.float32)
    for D in ((128,) if smoke else (64, 128, 256)):
        for dt in dts:
            q, k = torch.randn(1, 16, 4096, D, dtype=dt), torch.randn(1, 16, 4096, D, dtype=dt)
            rec.label = f"window fwd D={D} {dt}"
            _, lse = W.window_attention_fwd(q, k, k, None, None, 4096, 0, True, 0, D ** -0.5)
            rec.label = f"window bwd D={D} {dt}"
            W.window_attention_bwd(q, q, k, k, q, lse, None, None, 4096, 0, True, 0, D ** -0.5)
            if not smoke:
                rec.label = f"window decode D={D} {dt}"
                W.window_attention_fwd(q[:, :, :1], k, k, None, None, 4096, 0, True, 0, 0.1)


def _cross(rec, smoke):
    from mmcore.kernels import cross_attention as C
    for D in ((128,) if smoke else (64, 128)):
        q, k = torch.randn(2, 8, 4096, D, dtype=torch.bfloat16), torch.randn(2, 8, 577, D, dtype=torch.bfloat16)
        sq, sk = torch.tensor([4096, 3000]), torch.tensor([577, 400])
        rec.label = f"cross fwd D={D}"
        _, lse = C.cross_attention_fwd(q, k, k, sq, sk, D ** -0.5)
        rec.label = f"cross bwd D={D}"
        C.cross_attention_bwd(q, q, k, k, q, lse, sq, sk, D ** -0.5)
        if not smoke:
            rec.label = f"co-attention fwd D={D}"
            C.co_attention_fwd(q, k, k, sq, sk, k, q, q, sk, sq, D ** -0.5, res_a=q, res_b=k)


OPS = {"lora": _lora, "window": _window, "cross": _cross}


def audit(ops, smoke=False, on_report=None):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("sm90_audit: unset TRITON_INTERPRET (interpreted kernels cannot compile)")
    with Intercept(first_config_only=smoke, on_report=on_report) as rec:
        for op in ops:
            OPS[op](rec, smoke)
    return rec.reports


def _line(r):
    if "error" in r:
        return f"{r['case']:<34} {r['kernel']:<22} ERROR {r['error']}"
    flag = ("  SPILLS" if r["stack"] else "") + ("  SMEM>227K" if r["smem"] > SMEM_LIMIT else "")
    return (f"{r['case']:<34} {r['kernel']:<22} {json.dumps(r['config']):<70} w{r['num_warps']} "
            f"s{r['num_stages']}  regs {r['regs']:>3} stack {r['stack']:>5} "
            f"smem {r['smem'] // 1024:>3}K wgmma {r['wgmma']:>2}{flag}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help=f"any of {', '.join(OPS)} (default: all)")
    ap.add_argument("--smoke", action="store_true", help="one config per hot kernel")
    ap.add_argument("--json", help="write the reports here")
    a = ap.parse_args(argv)
    bad = [o for o in a.ops if o not in OPS]
    if bad:
        ap.error(f"unknown op(s) {bad}; choose from {list(OPS)}")
    reports = audit(a.ops or list(OPS), a.smoke, on_report=lambda r: print(_line(r), flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
