"""Each Triton kernel family compiles once per dtype and head dim, not once per shape.

Issue 11: a random-shape LoRA sweep spent about 6 s per new (M, K, N, r) compiling, so every
layer shape of a model paid a fresh compile.  Sizes are now runtime arguments that Triton does
not specialise (do_not_specialize; only N and K of the LoRA GEMM keep the divisibility-by-16
hint, which vectorises their masked loads), and autotune keys are bucketed.

No GPU needed: benchmarks/sm90_audit.py's Intercept records what the JIT would compile for
each launch -- the kernel, its specialisation (argument types, constants, divisibility hints)
and its config -- without compiling.  A "model" of many layer shapes must give one record per
kernel (default configs, as without autotuning).  Runs in a subprocess: this process has
TRITON_INTERPRET=1, under which kernels cannot be specialised."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import collections, json, sys
    import torch
    sys.path.insert(0, "benchmarks")
    from sm90_audit import Intercept
    from mmcore.kernels import cross_attention as C, lora_linear as L, window_attention as W

    def compiles(run):
        with Intercept(90) as rec:
            rec.default_only = True
            run()
        return dict(collections.Counter(j["kernel"] for j in rec.jobs))

    bf = torch.bfloat16

    def lora():  # the layers of a BERT-base / MiniLM / Llama-ish mix, fwd + bwd, 129..8191 rows
        for M, K, N, r in [(129, 768, 768, 8), (1000, 768, 3072, 16), (4096, 3072, 768, 16),
                           (8191, 384, 1536, 8), (2500, 4096, 11008, 16), (777, 1024, 4096, 4)]:
            x, w = torch.randn(M, K, dtype=bf), torch.randn(N, K, dtype=bf)
            a, b = torch.randn(1, r, K, dtype=bf), torch.randn(1, N, r, dtype=bf)
            L.lora_forward(x, w, None, a, b, torch.ones(1), None)
            L.lora_backward(x.new_empty(M, N), x, w, a, b, torch.ones(1), None, True, True, True)

    def window():  # lengths, windows, global tokens, heads, GQA groups vary; D = 64, causal, GQA
        for B, H, Hkv, S, win, G in [(1, 12, 6, 113, 64, 0), (2, 8, 2, 1000, 256, 1),
                                     (1, 16, 4, 4096, 1024, 4), (3, 4, 1, 2049, 16, 0)]:
            q, k = torch.randn(B, H, S, 64, dtype=bf), torch.randn(B, Hkv, S, 64, dtype=bf)
            _, lse = W.window_attention_fwd(q, k, k, None, None, win, 0, True, G, 0.125)
            W.window_attention_bwd(q, q, k, k, q, lse, None, None, win, 0, True, G, 0.125)

    def decode():  # one new token against caches of different fills and head counts
        for B, H, Hkv, Sk in [(1, 32, 8, 4096), (4, 8, 2, 700), (2, 16, 2, 100000)]:
            q, k = torch.randn(B, H, 1, 128, dtype=bf), torch.randn(B, Hkv, Sk, 128, dtype=bf)
            W.window_attention_fwd(q, k, k, None, None, -1, 0, True, 4, 0.09)

    def cross():  # text lengths, image token counts (looped K), heads vary; no GQA
        for B, H, Sq, Sk in [(2, 8, 100, 577), (1, 12, 4097, 1025), (3, 8, 1000, 729)]:
            q, k = torch.randn(B, H, Sq, 128, dtype=bf), torch.randn(B, H, Sk, 128, dtype=bf)
            sq, sk = torch.full((B,), Sq), torch.full((B,), Sk - 3)
            _, lse = C.cross_attention_fwd(q, k, k, sq, sk, 0.09)
            C.cross_attention_bwd(q, q, k, k, q, lse, sq, sk, 0.09)

    def dropout():  # attention dropout: a new seed every call, two values of p; the seeds
        # include ones whose seed key (drop_base) is a multiple of 16, which a specialised
        # int argument would compile separately
        seeds = [torch.tensor([s, 7]) for s in range(40)]
        assert any(W.dropout_args(0.1, s)["drop_base"] % 16 == 0 for s in seeds)
        q, k = torch.randn(2, 8, 300, 64, dtype=bf), torch.randn(2, 4, 300, 64, dtype=bf)
        for i, s in enumerate(seeds):
            p = (0.1, 0.25)[i % 2]
            _, lse = W.window_attention_fwd(q, k, k, None, None, 64, 0, True, 0, 0.125,
                                            dropout_p=p, seed=s)
            W.window_attention_bwd(q, q, k, k, q, lse, None, None, 64, 0, True, 0, 0.125,
                                   dropout_p=p, seed=s)
            _, lse = C.cross_attention_fwd(q, k, k, None, None, 0.125, dropout_p=p, seed=s)
            C.cross_attention_bwd(q, q, k, k, q, lse, None, None, 0.125, 0.0, p, s)

    print(json.dumps({n: compiles(f) for n, f in
                      [("lora", lora), ("window", window), ("decode", decode),
                       ("cross", cross), ("dropout", dropout)]}))
""")


def test_one_compile_per_kernel_family():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    # forward GEMM, dx GEMM (its own flags), x Aᵀ rows, dA and dBᵀ (one variant)
    assert got["lora"] == {"_lora_mm_kernel": 2, "_rows_lowrank_kernel": 1,
                           "_seg_outer_kernel": 1}, got["lora"]
    # fwd and dQ: the hot kernel and its non-finite fix-up variant (FLAGS = 2), each once
    assert got["window"] == {"_fwd_kernel": 2, "_bwd_dq_kernel": 2,
                             "_bwd_dkdv_kernel": 1}, got["window"]
    assert got["decode"] == {"_fwd_kernel": 1, "_combine_kernel": 1}, got["decode"]
    assert got["cross"] == {"_cross_fwd_kernel": 1, "_bwd_dq_kernel": 1,
                            "_bwd_dkdv_kernel": 1}, got["cross"]
    # dropout: one compile per kernel whatever the seed and p (window fwd / dQ with the fix-up
    # pass; both ops' dQ kernels are named _bwd_dq_kernel, likewise dK/dV)
    assert got["dropout"] == {"_fwd_kernel": 2, "_bwd_dq_kernel": 3, "_bwd_dkdv_kernel": 2,
                              "_cross_fwd_kernel": 1}, got["dropout"]
