"""Compile mmcore's Triton launches for Hopper (sm_90) and Ampere (sm_80) without a GPU.

No kernel runs.  The launchers in kernels/ are called with CPU tensors of real shapes while
``JITFunction.run`` and the autotuners' ``run`` are replaced, so that each launch -- each
config the autotuner would try, after its prune -- is recorded with the specialisation the
JIT would give it (ints equal to 1 become constants, ints and pointers divisible by 16 get the
divisibility hint).  The recorded launches are then compiled by Triton's own ptxas for the
target (a process pool; results cached by kernel source, specialisation, config, target and
Triton version) and reported:

    regs    registers per thread (255 = the cap)
    stack   bytes of local memory per thread (a frame ptxas reserved)
    local   local-memory loads / stores (STL / LDL) in the SASS: register spills, to be 0 on
            the hot paths (a stack frame that no instruction touches is not a spill)
    smem    shared memory per block (sm_90: at most 227 KB, sm_80: 163 KB)
    wgmma   Hopper tensor-core instructions in the PTX (0: mma.sync or FMA only)

    python benchmarks/sm90_audit.py [lora|window|cross ...] [--level smoke|ci|full]
                                    [--jobs N] [--check] [--json out.json]

Levels (what CI runs is ``ci``, under triton 3.9 and 3.6: tests/test_sm90_audit.py):
    smoke  the default config of each hot kernel, bf16, sm_90
    defaults  the default config of every launch
    ci     sm_90: every config the autotuner may try for the hot kernels (window fwd / dQ /
           dK/dV, cross fwd / dQ / dK/dV, LoRA GEMM) at D = 128, bf16 and fp16; the default
           config of every other launch (decode, combine, co-attention, LoRA
           low-rank / per-row / segment kernels, fp32, non-causal with lengths and global
           tokens, the issue-26 variants: softcap, key_bounds, key_mask, all three, window and
           cross; attention dropout: window causal / with softcap + key_mask / bounds /
           decoding, cross looped and short K); sm_80: the default config of each launch, bf16 (the issue-26
           and dropout variants in the full sweep only)
    full   every launch x config x dtype (bf16, fp16, fp32), D = 64, 128, 256, sm_90 and
           sm_80 (``./bootstrap.sh audit`` runs it under both Triton versions)

--check exits 1 on any compile error, any spill in a default config (the one used without
autotuning), shared memory over the target's limit, or a hot 16-bit sm_90 kernel without wgmma.
Run it with TRITON_INTERPRET unset: kernels decorated under the interpreter cannot be compiled.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
HOT = {"_lora_mm_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
       "_cross_fwd_kernel"}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_BLOCK_KEYS = ("BLOCK", "NUM_SPLITS", "M_BLOCKS", "SPLIT", "GROUP_M", "SINGLE", "FUSE_T",
               "PER_ROW", "HAS_MAP", "CAUSAL", "HAS_SQ", "HAS_SK", "D", "HAS_SOFTCAP", "BOUNDS",
               "KEY_MASK", "DROPOUT", "GRANS", "ROWS")


def _jit_fn(fn):
    from triton.runtime.autotuner import Autotuner
    while isinstance(fn, Autotuner) or not hasattr(fn, "arg_names"):
        fn = fn.fn
    return fn


def _specialise(fn, args, kwargs):
    """-> (signature, constants, names with the divisibility-16 hint), as the JIT would."""
    import torch
    dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8",
              torch.int8: "i8"}
    bound = dict(zip(fn.arg_names, args))
    dns = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
    sig, consts, div = {}, {}, []
    for p in fn.params:
        v = bound[p.name] if p.name in bound else kwargs.get(p.name, p.default)
        if p.is_constexpr or v is None:
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + dtypes[v.dtype]
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
    return {**sig, **{n: "constexpr" for n in consts}}, consts, sorted(div)


# ----------------------------------------------------------------- recording launches


class Intercept:
    """Within ``with Intercept() as rec:`` Triton launches are recorded, not run:
    rec.jobs holds one dict per distinct (kernel, specialisation, config, arch).
    default_only: record only the config used without autotuning (the first kept)."""

    def __init__(self, arch=90):
        self.jobs, self.label, self.arch, self.default_only = [], "", arch, False
        self._seen = set()

    def _record(self, fn, args, kwargs, nw, ns, default):
        sig, consts, div = _specialise(fn, args, kwargs)
        key = (fn.__name__, fn.__module__, repr(sig), repr(sorted(consts.items())), repr(div),
               nw, ns, self.arch)
        if key in self._seen:
            return
        self._seen.add(key)
        self.jobs.append(dict(kernel=fn.__name__, module=fn.__module__, sig=sig,
                              consts=consts, div=div, num_warps=nw, num_stages=ns,
                              arch=self.arch, case=self.label, default=default))

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        from mmcore.kernels import _autotune
        self._saved = (JITFunction.run, Autotuner.run, _autotune.SafeAutotuner.run,
                       _autotune.CPU_SMEM_LIMIT, _autotune.CPU_ARCH)
        # the prunes pick and size tiles for this target
        _autotune.CPU_SMEM_LIMIT, _autotune.CPU_ARCH = SMEM_LIMIT[self.arch], self.arch
        rec = self

        def jit_run(fn, *args, grid, warmup=False, **kwargs):
            nw, ns = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
            kwargs.pop("num_ctas", None)
            default = kwargs.pop("_audit_default", True)
            rec._record(fn, args, kwargs, nw, ns, default)

        def auto_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            for i, c in enumerate(configs[:1] if rec.default_only else configs):
                tuner.fn.run(*args, **kwargs, **c.all_kwargs(), _audit_default=i == 0)

        JITFunction.run = jit_run
        Autotuner.run = _autotune.SafeAutotuner.run = auto_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        from mmcore.kernels import _autotune
        (JITFunction.run, Autotuner.run, _autotune.SafeAutotuner.run,
         _autotune.CPU_SMEM_LIMIT, _autotune.CPU_ARCH) = self._saved
        return False


# ----------------------------------------------------------------- the launches audited


def _dtypes(names):
    import torch
    return [getattr(torch, _DTYPE_NAMES[n]) for n in names]


def _every(level, dt):
    """Whether the hot launches record every config the autotuner may try (else the default)."""
    import torch
    return level == "full" or (level == "ci" and dt != torch.float32)


def _extras(level, dt, dtypes):
    """Whether the secondary launches (other variants, default configs) run for dtype dt:
    every dtype in the full sweep, else the first only (the CI subset's budget)."""
    return level == "full" or dt == dtypes[0]


def _lora(rec, level, dtypes):
    import torch
    from mmcore.kernels import lora_linear as L
    shapes = [(8192, 4096, 4096, 16)]
    if level == "full":
        shapes += [(8192, 4096, 4096, 128), (2048, 768, 3072, 16), (40, 768, 3072, 16)]
    for dt in dtypes:
        for M, K, N, r in shapes:
            rec.default_only = not _every(level, dt)
            x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
            a, b, s = torch.randn(1, r, K, dtype=dt), torch.randn(1, N, r, dtype=dt), torch.ones(1)
            rec.label = f"lora fwd M={M} {K}->{N} r={r} {dt}"
            L.lora_forward(x, w, None, a, b, s, None)
            rec.label = f"lora bwd M={M} {K}->{N} r={r} {dt}"
            rec.default_only = level != "full"  # dx: the forward's tiles with other flags
            L.lora_backward(x.new_empty(M, N), x, w, a, b, s, None, True, level != "smoke",
                            level != "smoke")
        if level == "smoke":
            continue
        rec.default_only = level != "full"
        if not _extras(level, dt, dtypes):
            continue
        a, b = torch.randn(8, 16, 4096, dtype=dt), torch.randn(8, 4096, 16, dtype=dt)
        s = torch.ones(8)
        x, w = torch.randn(8192, 4096, dtype=dt), torch.randn(4096, 4096, dtype=dt)
        ids = torch.randint(-1, 8, (8192,))
        rec.label = f"lora fwd 8 adapters M=8192 {dt}"
        L.lora_forward(x, w, None, a, b, s, ids)
        rec.label = f"lora bwd 8 adapters M=8192 {dt}"
        L.lora_backward(x.new_empty(8192, 4096), x, w, a, b, s, ids, True, True, True)
        rec.label = f"lora fwd per-row adapters M=64 {dt}"
        L.lora_forward(x[:64], w, torch.randn(4096, dtype=dt), a, b, s, ids[:64])
        # DoRA (peft use_dora): the col_scale epilogue storing the bracket too, on a Conv1D
        # weight read through its transposed view
        rec.label = f"lora fwd col_scale + pre, transposed weight M=8192 {dt}"
        L.lora_forward(x, w.t(), torch.randn(4096, dtype=dt), a[:1], b[:1], s[:1], None,
                       col_scale=torch.ones(4096), want_pre=True)


def _dims_dtypes(rec, level, dtypes):
    """(D, dtype) pairs of an attention op's sweep; sets whether every config is recorded."""
    for D in (64, 128, 256) if level == "full" else (128,):
        for dt in dtypes:
            rec.default_only = not _every(level, dt)
            yield D, dt


def _window(rec, level, dtypes):
    import torch
    from mmcore.kernels import window_attention as W
    for D, dt in _dims_dtypes(rec, level, dtypes):
        q, k = torch.randn(1, 16, 4096, D, dtype=dt), torch.randn(1, 4, 4096, D, dtype=dt)
        rec.label = f"window fwd D={D} {dt}"
        _, lse = W.window_attention_fwd(q, k, k, None, None, 4096, 0, True, 0, D ** -0.5)
        rec.label = f"window bwd D={D} {dt}"
        W.window_attention_bwd(q, q, k, k, q, lse, None, None, 4096, 0, True, 0, D ** -0.5)
        if level == "smoke" or not _extras(level, dt, dtypes):
            continue
        # non-causal, per-sample lengths, global tokens: other constexpr variants
        rec.default_only = level != "full"
        lens = torch.tensor([4096])
        rec.label = f"window fwd lens+G D={D} {dt}"
        _, lse = W.window_attention_fwd(q, k, k, lens, lens, 256, 256, False, 2, D ** -0.5)
        rec.label = f"window bwd lens+G D={D} {dt}"
        W.window_attention_bwd(q, q, k, k, q, lse, lens, lens, 256, 256, False, 2,
                               D ** -0.5)
        rec.label = f"window decode D={D} {dt}"
        W.window_attention_fwd(q[:, :, :1], k, k, None, lens, 4096, 0, True, 0, 0.1)
        W.window_attention_fwd(q[:, :, :1], k[:, :, :64], k[:, :, :64], None, None, 4096,
                               0, True, 0, 0.1)  # a single split: no combine
        if rec.arch == 90 or level == "full":  # (CI's budget: sm_80 in the full sweep only)
            _window_masks(rec, W, q, k, lens, D, dt)


def _window_masks(rec, W, q, k, lens, D, dt):
    """The issue-26 variants (constexpr HAS_SOFTCAP, BOUNDS, KEY_MASK), default configs:
    Gemma-2's softcap 50 on a causal window, key_bounds (a causal band of 4096 as (lo, hi)),
    a key_mask on a sliding window, all three at once, and decoding with all three.  Attention
    dropout (constexpr DROPOUT): on the causal window, with softcap and a key_mask on a
    bidirectional one, in bounds mode, and decoding (split-K)."""
    import torch
    S = q.shape[2]
    i = torch.arange(S, dtype=torch.int32)[None]
    lo, hi = (i - 4095).clamp(min=0), i + 1
    km = torch.ones(1, S, dtype=torch.bool)
    seed = torch.tensor([12345, 678])
    variants = (("softcap", dict(softcap=50.0), (4096, 0, True)),
                ("bounds", dict(key_lo=lo, key_hi=hi), (-1, -1, False)),
                ("key_mask", dict(key_mask=km), (256, 256, False)),
                ("softcap+bounds+key_mask", dict(softcap=50.0, key_lo=lo, key_hi=hi, key_mask=km),
                 (-1, -1, False)),
                ("dropout", dict(dropout_p=0.1, seed=seed), (4096, 0, True)),
                ("dropout+softcap+key_mask", dict(dropout_p=0.1, seed=seed, softcap=50.0,
                                                  key_mask=km), (256, 256, False)),
                ("dropout+bounds", dict(dropout_p=0.1, seed=seed, key_lo=lo, key_hi=hi),
                 (-1, -1, False)))
    for name, kw, (left, right, causal) in variants:
        rec.label = f"window fwd {name} D={D} {dt}"
        _, lse = W.window_attention_fwd(q, k, k, None, lens, left, right, causal, 0, D ** -0.5,
                                        **kw)
        rec.label = f"window bwd {name} D={D} {dt}"
        W.window_attention_bwd(q, q, k, k, q, lse, None, lens, left, right, causal, 0,
                               D ** -0.5, **kw)
    rec.label = f"window decode softcap+bounds+key_mask D={D} {dt}"
    W.window_attention_fwd(q[:, :, :1], k, k, None, lens, -1, -1, False, 0, 0.1, softcap=50.0,
                           key_lo=lo[:, -1:], key_hi=hi[:, -1:], key_mask=km)
    rec.label = f"window decode dropout D={D} {dt}"
    W.window_attention_fwd(q[:, :, :1], k, k, None, lens, 4096, 0, True, 0, 0.1, dropout_p=0.1,
                           seed=seed)


def _cross(rec, level, dtypes):
    import torch
    from mmcore.kernels import cross_attention as C
    for D, dt in _dims_dtypes(rec, level, dtypes):
        q, k = torch.randn(2, 8, 4096, D, dtype=dt), torch.randn(2, 8, 577, D, dtype=dt)
        sq, sk = torch.tensor([4096, 3000]), torch.tensor([577, 400])
        rec.label = f"cross fwd D={D} {dt}"
        _, lse = C.cross_attention_fwd(q, k, k, sq, sk, D ** -0.5)
        rec.label = f"cross bwd D={D} {dt}"
        C.cross_attention_bwd(q, q, k, k, q, lse, sq, sk, D ** -0.5)
        if level == "smoke" or not _extras(level, dt, dtypes):
            continue
        rec.default_only = level != "full"
        rec.label = f"cross fwd short K D={D} {dt}"  # the whole K/V in one tile
        C.cross_attention_fwd(q, k[:, :, :49], k[:, :, :49], None, None, D ** -0.5)
        rec.label = f"co-attention fwd D={D} {dt}"
        C.co_attention_fwd(q, k, k, sq, sk, k, q, q, sk, sq, D ** -0.5, res_a=q, res_b=k)
        if rec.arch != 90 and level != "full":
            continue
        rec.label = f"cross fwd softcap D={D} {dt}"  # Gemma-2's softcap 50 (issue 26)
        _, lse = C.cross_attention_fwd(q, k, k, sq, sk, D ** -0.5, 50.0)
        rec.label = f"cross bwd softcap D={D} {dt}"
        C.cross_attention_bwd(q, q, k, k, q, lse, sq, sk, D ** -0.5, 50.0)
        rec.label = f"cross fwd short K softcap D={D} {dt}"
        C.cross_attention_fwd(q, k[:, :, :49], k[:, :, :49], None, None, D ** -0.5, 50.0)
        seed = torch.tensor([12345, 678])  # attention dropout (constexpr DROPOUT)
        rec.label = f"cross fwd dropout D={D} {dt}"
        _, lse = C.cross_attention_fwd(q, k, k, sq, sk, D ** -0.5, dropout_p=0.1, seed=seed)
        rec.label = f"cross bwd dropout D={D} {dt}"
        C.cross_attention_bwd(q, q, k, k, q, lse, sq, sk, D ** -0.5, 0.0, 0.1, seed)
        rec.label = f"cross fwd short K dropout D={D} {dt}"
        C.cross_attention_fwd(q, k[:, :, :49], k[:, :, :49], None, None, D ** -0.5,
                              dropout_p=0.1, seed=seed)


OPS = {"lora": _lora, "window": _window, "cross": _cross}


def collect(ops, level="ci", archs=None, dtypes=None):
    """Record the launches of `ops` at `level` -> list of job dicts (nothing compiled)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("sm90_audit: unset TRITON_INTERPRET (interpreted kernels cannot compile)")
    os.environ.setdefault("MMCORE_TRITON_AUTOTUNE", "1")  # the prunes keep every config
    archs = archs or ((90,) if level == "smoke" else (90, 80))
    if dtypes is None:
        dtypes = {"smoke": ["bf16"], "ci": ["bf16", "fp16", "fp32"]}.get(
            level, ["bf16", "fp16", "fp32"])
    jobs = []
    for arch in archs:
        with Intercept(arch) as rec:
            lvl = level if arch == 90 or level != "ci" else "defaults"
            dts = dtypes if arch == 90 or level == "full" else ["bf16"]
            for op in ops:
                OPS[op](rec, lvl, _dtypes(dts))
        jobs += rec.jobs
    return jobs


# ----------------------------------------------------------------- compiling


def _cache_dir():
    d = os.environ.get("MMCORE_AUDIT_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "mmcore", "compile_audit"))
    os.makedirs(d, exist_ok=True)
    return d


def _job_key(fn, job):
    import triton
    h = hashlib.sha256()
    for part in ("local-v2", fn.cache_key, triton.__version__, job["sig"], sorted(job["consts"].items()),
                 job["div"], job["num_warps"], job["num_stages"], job["arch"]):
        h.update(repr(part).encode())
    return h.hexdigest()


def compile_job(job, use_cache=True):
    """Compile one recorded launch -> report dict (see the module docstring)."""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(getattr(importlib.import_module(job["module"]), job["kernel"]))
    key = _job_key(fn, job)
    path = os.path.join(_cache_dir(), key + ".json") if use_cache else None
    blocks = {n: v for n, v in job["consts"].items() if n.startswith(_BLOCK_KEYS)}
    base = dict(kernel=job["kernel"], config=blocks, num_warps=job["num_warps"],
                num_stages=job["num_stages"], arch=job["arch"], case=job["case"],
                default=job["default"], dtype=_main_dtype(job["sig"]),
                cold=job["consts"].get("FLAGS") == 2,
                triton=triton.__version__)
    if path and os.path.exists(path):
        with open(path) as f:
            return {**base, **json.load(f), "cached": True}
    t0 = _cpu_seconds()
    try:
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["div"]}
        full = {n: job["sig"][n] for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, full, job["consts"], attrs),
                           target=GPUTarget("cuda", job["arch"], 32),
                           options=dict(num_warps=job["num_warps"],
                                        num_stages=job["num_stages"]))
        ptx = k.asm["ptx"]
        res = _resource_usage(k.asm["cubin"])
        out = dict(regs=res[0], stack=res[1], local=res[2], smem=int(k.metadata.shared),
                   wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                   cpu_s=round(_cpu_seconds() - t0, 2))
    except Exception as e:  # reported, not raised: the audit goes on
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {**base, "error": f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300],
                "cpu_s": round(_cpu_seconds() - t0, 2), "cached": False}
    if path:
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
    return {**base, **out, "cached": False}


def _main_dtype(sig):
    for t in sig.values():
        if t in ("*bf16", "*fp16", "*fp32"):
            return t[1:]
    return "?"


def _cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _resource_usage(cubin):
    """-> (registers, stack bytes, local-memory instructions in the SASS).  A stack frame
    alone is not a spill (ptxas may reserve one it never touches); spilled registers are
    stored and reloaded with STL / LDL."""
    import triton.backends.nvidia as nv
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(m.group(1)), int(m.group(2)), len(re.findall(r"\b(?:STL|LDL)(?:\.\S+)?\s", sass))


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def compile_all(jobs, n_jobs=None, use_cache=True, on_report=None):
    """Compile every job (a spawn process pool of n_jobs) -> reports in job order."""
    n_jobs = n_jobs or os.cpu_count() or 1
    reports = [None] * len(jobs)
    if n_jobs <= 1:
        for i, j in enumerate(jobs):
            reports[i] = compile_job(j, use_cache)
            if on_report:
                on_report(reports[i])
        return reports
    with cf.ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"),
                                initializer=_worker_init) as ex:
        futs = {ex.submit(compile_job, j, use_cache): i for i, j in enumerate(jobs)}
        for f in cf.as_completed(futs):
            reports[futs[f]] = r = f.result()
            if on_report:
                on_report(r)
    return reports


# ----------------------------------------------------------------- checks and output


def _dot_rows(r):
    """Rows of the kernel's main dot (wgmma needs 64): BLOCK_N for dK/dV (Kᵀ-side products),
    else BLOCK_M."""
    c = r["config"]
    return c.get("BLOCK_N", 0) if r["kernel"] == "_bwd_dkdv_kernel" else c.get("BLOCK_M", 0)


def problems(reports):
    """What --check fails on -> list of one-line descriptions."""
    out = []
    for r in reports:
        what = (f"sm_{r['arch']} {r['case']} {r['kernel']} {json.dumps(r['config'])} "
                f"w{r['num_warps']} s{r['num_stages']}")
        if "error" in r:
            out.append(f"{what}: does not compile: {r['error']}")
            continue
        # (the non-finite fix-up pass, FLAGS = 2, is cold: it runs only for flagged rows)
        if r["default"] and r["stack"] and r.get("local", 1) and not r.get("cold"):
            out.append(f"{what}: default config spills {r['stack']} bytes per thread "
                       f"({r.get('local', '?')} local loads / stores)")
        if r["smem"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"{what}: {r['smem']} bytes of shared memory > {SMEM_LIMIT[r['arch']]}")
        if (r["arch"] == 90 and r["default"] and r["kernel"] in HOT and not r["wgmma"]
                and r["dtype"] in ("bf16", "fp16") and _dot_rows(r) >= 64):
            out.append(f"{what}: no wgmma in the PTX")
    return out


def summary(reports, wall=None):
    import triton
    ok = [r for r in reports if "error" not in r]
    spills = lambda r: bool(r["stack"] and r.get("local", 1))  # noqa: E731
    lines = [f"triton {triton.__version__}: {len(reports)} launches compiled "
             f"({sum(r.get('cached', False) for r in reports)} from the cache), "
             f"{len(reports) - len(ok)} failed, "
             f"{sum(1 for r in ok if spills(r))} spill "
             f"({sum(1 for r in ok if spills(r) and r['default'] and not r.get('cold'))} of "
             f"them hot default configs), "
             f"{sum(1 for r in ok if r['smem'] > SMEM_LIMIT[r['arch']])} over shared memory; "
             f"compile CPU {sum(r.get('cpu_s', 0) for r in reports):.0f} s"
             + (f", wall {wall:.0f} s" if wall is not None else "")]
    by = {}
    for r in reports:
        k = (r["arch"], r["kernel"], r["dtype"])
        b = by.setdefault(k, [0, 0, 0, 0])
        b[0] += 1
        b[1] += "error" in r
        b[2] += "error" not in r and spills(r)
        b[3] = max(b[3], r.get("regs", 0))
    for (arch, kern, dt), (n, err, sp, regs) in sorted(by.items()):
        lines.append(f"  sm_{arch} {kern:<22} {dt:<5} {n:>3} configs  {err} failed  "
                     f"{sp} spill  max regs {regs}")
    return "\n".join(lines)


def line(r):
    head = f"sm_{r['arch']} {r['case']:<34} {r['kernel']:<22}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    flag = (("  SPILLS" if r["stack"] and r.get("local", 1) else "") + ("  SMEM>LIMIT" if r["smem"] >
                                                  SMEM_LIMIT[r["arch"]] else "")
            + ("  (default)" if r["default"] else ""))
    return (f"{head} {json.dumps(r['config']):<60} w{r['num_warps']} s{r['num_stages']}  "
            f"regs {r['regs']:>3} stack {r['stack']:>5} local {r.get('local', '?'):>3} smem {r['smem'] // 1024:>3}K "
            f"wgmma {r['wgmma']:>2}{flag}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help=f"any of {', '.join(OPS)} (default: all)")
    ap.add_argument("--level", choices=("smoke", "defaults", "ci", "full"), default="full")
    ap.add_argument("--smoke", action="store_true", help="same as --level smoke")
    ap.add_argument("--arch", type=int, nargs="+", choices=sorted(SMEM_LIMIT),
                    help="targets (default: 90 and 80; smoke: 90)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPE_NAMES))
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs)")
    ap.add_argument("--no-cache", action="store_true", help="recompile even when cached")
    ap.add_argument("--check", action="store_true", help="exit 1 on any problem (see above)")
    ap.add_argument("--quiet", action="store_true", help="no per-launch lines")
    ap.add_argument("--json", help="write the reports here")
    a = ap.parse_args(argv)
    bad = [o for o in a.ops if o not in OPS]
    if bad:
        ap.error(f"unknown op(s) {bad}; choose from {list(OPS)}")
    level = "smoke" if a.smoke else a.level
    t0 = time.time()
    jobs = collect(a.ops or list(OPS), level, a.arch, a.dtypes)
    reports = compile_all(jobs, a.jobs, not a.no_cache,
                          on_report=None if a.quiet else lambda r: print(line(r), flush=True))
    print(summary(reports, time.time() - t0), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    found = problems(reports)
    for p in found:
        print("PROBLEM", p)
    return 1 if (a.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
