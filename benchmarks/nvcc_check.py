"""Compile csrc/cuda for sm_80 and sm_90 without a GPU and report what ptxas made of it.

    python benchmarks/nvcc_check.py [--arch 80 --arch 90] [--json out.json] [--markdown]

Every csrc/cuda/*.cu is compiled to a cubin per arch with nvcc (the flags torch's
CUDAExtension uses, plus -Xptxas -v), one process per (file, arch), in parallel; nothing is
linked and no CUDA build of torch is needed.  Per kernel: registers, spill stores / loads,
stack frame, static shared memory, plus the dynamic shared memory of the decode kernel
(decode::smem_bytes, printed by a host build of window_decode_plan.h) and the blocks per SM
those allow.  The host binding files (csrc/cuda/*_op.cpp) are syntax-checked with
-DMMCORE_WITH_CUDA against the installed torch's headers (a CPU wheel lacks
c10/cuda/impl/cuda_cmake_macros.h: a one-line stand-in is generated).

Exit status 1 on any compile error or any spill.  Results are cached in the temp dir, keyed
on the sources, flags and nvcc version (a second run in the same CI job is free).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS + setup.py's nvcc flags
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "-DMMCORE_WITH_CUDA", "-Xptxas", "-v"]
# shared memory per SM / per block (bytes) and the 1 KiB the driver reserves per block
SMEM_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SMEM_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
THREADS = {"window_decode_kernel": 128, "window_decode_combine": 128, "sgmv_shrink_kernel": 128,
           "sgmv_expand_kernel": 128, "sgmv_plan_kernel": 1024}


def cuda_home():
    """The CUDA toolkit: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or where nvcc lives."""
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    n = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(n))) if n else None


def nvcc():
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _demangle(names):
    tool = shutil.which("cu++filt") or os.path.join(os.path.dirname(nvcc() or ""), "cu++filt")
    tool = tool if os.path.exists(tool) else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines())) if out else {n: n for n in names}


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text):
    """ptxas -v output -> [{mangled, arch, regs, stack, spill_stores, spill_loads, smem}]."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": int(m.group(2)), "regs": None, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return rows


def compile_cu(path, arch, outdir):
    out = os.path.join(outdir, f"{os.path.basename(path)}.sm{arch}.cubin")
    cmd = [nvcc(), "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-I", CUDA_DIR, path, "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return {"file": os.path.relpath(path, ROOT), "arch": arch, "rc": p.returncode,
            "log": p.stdout + p.stderr, "cmd": " ".join(cmd)}


def _host_includes(shim):
    import torch.utils.cpp_extension as ce

    inc = [shim, *ce.include_paths(), os.path.join(cuda_home(), "include"),
           sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    return [f"-I{p}" for p in inc]


def check_host(path, shim):
    cxx = shutil.which("c++") or shutil.which("g++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DMMCORE_WITH_CUDA", *_host_includes(shim), path]
    p = subprocess.run(cmd, capture_output=True, text=True)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    return {"file": os.path.relpath(path, ROOT), "rc": p.returncode, "log": "\n".join(errors)}


def decode_smem(tmp):
    """{padded head dim: dynamic smem bytes} from a host build of window_decode_plan.h."""
    src = os.path.join(tmp, "smem.cpp")
    with open(src, "w") as f:
        f.write('#include <cstdio>\n#include "window_decode_plan.h"\n'
                "int main() { for (int d : (int[]){64, 128, 256}) "
                'std::printf("%d %lld\\n", d, (long long)mmcore::decode::smem_bytes(d)); }\n')
    exe = os.path.join(tmp, "smem")
    cxx = shutil.which("c++") or shutil.which("g++")
    subprocess.run([cxx, "-std=c++17", "-I", CUDA_DIR, src, "-o", exe], check=True)
    out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    return {int(a): int(b) for a, b in (ln.split() for ln in out.splitlines())}


def blocks_per_sm(arch, regs, threads, smem):
    warps = (threads + 31) // 32
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = 65536 // (warps * per_warp) if regs else 32
    by_smem = SMEM_SM.get(arch, 100 * 1024) // (smem + 1024) if smem else 32
    return min(by_regs, by_smem, 2048 // threads, 32)


def _key(archs, host):
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(CUDA_DIR, "*"))):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(" ".join(NVCC_FLAGS + [str(a) for a in archs] + [str(host)]).encode())
    h.update(subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def run(archs=(80, 90), host=True, jobs=None):
    """-> {"kernels": [...], "compiles": [...], "host": [...], "ok": bool}."""
    if nvcc() is None:
        return {"ok": False, "error": "nvcc not found (CUDA toolkit)", "kernels": [],
                "compiles": [], "host": []}
    cache = os.path.join(tempfile.gettempdir(), f"mmcore_nvcc_check_{_key(archs, host)}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            res = json.load(f)
        res["cached"] = cache
        return res
    cus = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    hosts = sorted(glob.glob(os.path.join(CUDA_DIR, "*_op.cpp"))) if host else []
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "shim")
        os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
        with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dyn = decode_smem(tmp)
        with cf.ThreadPoolExecutor(jobs or max(2, os.cpu_count() or 2)) as ex:
            futs = [ex.submit(compile_cu, p, a, tmp) for p in cus for a in archs]
            hfuts = [ex.submit(check_host, p, shim) for p in hosts]
            compiles = [f.result() for f in futs]
            host_res = [f.result() for f in hfuts]
    kernels = []
    for c in compiles:
        for r in parse_ptxas(c["log"]):
            r["file"] = c["file"]
            kernels.append(r)
    names = _demangle(sorted({k["mangled"] for k in kernels}))
    for k in kernels:
        k["kernel"] = names.get(k["mangled"], k["mangled"]).replace("(anonymous namespace)::", "")
        base = k["kernel"].split("(")[0].split("<")[0].split("::")[-1].split()[-1]
        k["name"] = base
        if base == "window_decode_kernel":
            dp = int(re.search(r", (\d+)>", k["kernel"]).group(1))
            k["dyn_smem"] = dyn[dp]
        k["blocks_per_sm"] = blocks_per_sm(k["arch"], k["regs"] or 0, THREADS.get(base, 128),
                                           k["smem"] + k.get("dyn_smem", 0))
    ok = (all(c["rc"] == 0 for c in compiles) and all(h["rc"] == 0 for h in host_res)
          and bool(kernels)
          and all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in kernels))
    res = {"ok": ok, "archs": list(archs), "kernels": kernels, "host": host_res,
           "compiles": [{k: c[k] for k in ("file", "arch", "rc")} |
                        ({"log": c["log"][-4000:]} if c["rc"] else {}) for c in compiles]}
    if ok:
        with open(cache, "w") as f:
            json.dump(res, f)
    return res


def markdown(res):
    lines = ["| kernel | arch | regs | spill st/ld (B) | stack (B) | smem static + dynamic (B) "
             "| blocks/SM |", "|---|---|---|---|---|---|---|"]
    for k in sorted(res["kernels"], key=lambda k: (k["name"], k["kernel"], k["arch"])):
        short = re.sub(r"\(.*\)$", "", k["kernel"]).replace("mmcore::cuda::", "")
        short = short.replace("void ", "").replace("__nv_bfloat16", "bf16")
        short = short.replace("__half", "fp16")
        smem = f"{k['smem']} + {k['dyn_smem']}" if "dyn_smem" in k else str(k["smem"])
        lines.append(f"| `{short}` | sm_{k['arch']} | {k['regs']} | {k['spill_stores']}/"
                     f"{k['spill_loads']} | {k['stack']} | {smem} | {k['blocks_per_sm']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="SM arch (default 80 and 90)")
    ap.add_argument("--no-host", action="store_true", help="skip the binding syntax check")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md table")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    res = run(tuple(a.arch or (80, 90)), host=not a.no_host, jobs=a.jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    for c in res["compiles"]:
        state = "ok" if c["rc"] == 0 else "FAILED"
        print(f"nvcc {c['file']} sm_{c['arch']}: {state}")
        if c["rc"]:
            print(c.get("log", ""))
    for h in res["host"]:
        print(f"c++ -fsyntax-only -DMMCORE_WITH_CUDA {h['file']}: "
              f"{'ok' if h['rc'] == 0 else 'FAILED'}")
        if h["rc"]:
            print(h["log"])
    print(markdown(res))
    bad = [k for k in res["kernels"] if k["spill_stores"] or k["spill_loads"]]
    for k in bad:
        print(f"SPILL: {k['kernel']} sm_{k['arch']}: {k['spill_stores']} B stores, "
              f"{k['spill_loads']} B loads", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
