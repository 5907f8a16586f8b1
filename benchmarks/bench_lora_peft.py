"""mmcore.nn.LoRALinear against peft's LoRA layer on the same weights.

Cases (ratio = peft_ms / ours_ms, both measured in this run):
  * one adapter, forward (inference, no_grad) and forward+backward (x, A, B need grads; the
    base is frozen), BERT-base FFN (768 -> 3072) and Llama-7B attention (4096 -> 4096)
    projections, r in {8, 16, 64}, M = tokens in {1, 512, 2048} (GPU: up to 16384);
  * mixed-adapter batches: 1 / 8 / 64 distinct adapters over the batch's sequences, ours
    (``adapter_ids``, stacked adapters, one fused call) vs peft's ``adapter_names=`` forward
    (a loop over adapters with boolean indexing).
  * peft's own layers converted by ``mmcore.nn.convert_peft_model`` against the same layers
    unconverted: DoRA (``use_dora=True``: peft's DoRA forward vs the op's col_scale
    epilogue) on an nn.Linear, and plain LoRA on a transformers Conv1D (GPT-2 storage),
    forward and forward+backward (A, B and DoRA's magnitude trainable), BERT FFN shape, r=16.
Plus F.linear alone (the floor) for each single-adapter shape.
CPU: fp32; GPU: bf16 (peft with bf16 adapters, autocast_adapter_dtype=False, like for like).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.benchmarks import harness
from mmcore.nn import LoRALinear
from mmcore.ops import registry

OP = "lora_peft"
SHAPES = {"bert-ffn": (768, 3072), "llama7b-attn": (4096, 4096)}


class _Holder(nn.Module):
    def __init__(self, k, n, dtype, device):
        super().__init__()
        self.proj = nn.Linear(k, n, dtype=dtype, device=device)

    def forward(self, x):
        return self.proj(x)


def _pair(K, N, r, dtype, device, n_adapters=1, seed=0):
    """(peft lora.Linear, our LoRALinear) over the same base and adapter tensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(_Holder(K, N, dtype, device),
                        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
                        autocast_adapter_dtype=False)
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    pl = pm.base_model.model.proj
    ours = LoRALinear(pl.base_layer, adapter_name=None)  # shares the frozen base
    with torch.no_grad():
        for name in pl.lora_A:
            pl.lora_B[name].weight.normal_(0, 0.02)  # non-zero B: the LoRA term is real
            ours.add_adapter(name, r=r, lora_alpha=2 * r, init_lora_weights=None)
            ours.lora_A[name].weight.copy_(pl.lora_A[name].weight)
            ours.lora_B[name].weight.copy_(pl.lora_B[name].weight)
    for m in (pl, ours):
        m.eval()
        for name in m.lora_A:
            m.lora_A[name].weight.requires_grad_(True)
            m.lora_B[name].weight.requires_grad_(True)
    return pl, ours


def _backend(device, dtype, K, r, adapters, grad):
    p = registry.Problem("lora_linear", torch.device(device).type, dtype, head_dim=K, rank=r,
                         adapters=adapters, needs_grad=grad)
    try:
        return registry.select("lora_linear", p, "auto").backend
    except Exception:
        return "?"


def _flops(M, K, N, r, bwd):
    f = 2 * M * N * K + 2 * M * r * (K + N)
    if bwd:  # dx = dy W + s (dy B) A;  dA = s (dy B)ᵀ x;  dB = s dyᵀ (x Aᵀ)
        f += 2 * M * N * K + 4 * M * N * r + 4 * M * r * K
    return f


def _single(device, dtype, label, K, N, r, M, timer):
    pl, ours = _pair(K, N, r, dtype, device)
    x = torch.randn(M, K, dtype=dtype, device=device)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    W, b = pl.base_layer.weight, pl.base_layer.bias
    shape = {"M": M, "K": K, "N": N, "r": r}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        bwd = mode == "fwd+bwd"
        xg = x.detach().clone().requires_grad_(bwd)

        def run(fn):
            if bwd:
                return lambda: fn(xg).backward(dy)

            def inference():
                with torch.no_grad():
                    return fn(xg)
            return inference

        floor = run(lambda t: F.linear(t, W, b))

        case = f"{mode} {label} r={r} M={M}"
        t_peft = timer(run(pl))
        t_ours = timer(run(ours))
        t_floor = timer(floor)
        be = _backend(device, dtype, K, r, 1, bwd)
        fl = _flops(M, K, N, r, bwd)
        rows.append(harness.row(OP, case, "peft:LoraLayer", shape, dtype, device, t_peft,
                                flops=fl))
        rows.append(harness.floor_note(
            harness.row(OP, case, f"mmcore:LoRALinear[{be}]", shape, dtype, device, t_ours,
                        flops=fl, baseline_ms=t_peft["median_ms"], baseline="peft:LoraLayer"),
            "F.linear", t_floor["median_ms"]))
        rows.append(harness.row(OP, case, "F.linear (floor, no LoRA)", shape, dtype, device,
                                t_floor, flops=2 * M * N * K * (2 if bwd else 1)))
    return rows


def _converted_pair(K, N, r, dtype, device, kind):
    """(peft lora.Linear, the same layer converted by convert_peft_model): kind "dora" (DoRA on
    an nn.Linear) or "conv1d" (plain LoRA on transformers' Conv1D)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from mmcore.nn import convert_peft_model

    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        holder = nn.Module()
        holder.proj = Conv1D(N, K).to(device=device, dtype=dtype)
        holder.forward = lambda x: holder.proj(x)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], fan_in_fan_out=True)
    else:
        holder = _Holder(K, N, dtype, device)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], use_dora=True)
    pm = get_peft_model(holder, cfg, autocast_adapter_dtype=False)
    pl = pm.base_model.model.proj
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_(0, 0.02)
    pl.eval()
    conv = copy.deepcopy(pm)
    rep = convert_peft_model(conv)
    assert rep["converted"], rep
    return pl, conv.base_model.model.proj


def _converted(device, dtype, label, K, N, r, M, kind, timer):
    pl, ours = _converted_pair(K, N, r, dtype, device, kind)
    x = torch.randn(M, K, dtype=dtype, device=device)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    shape = {"M": M, "K": K, "N": N, "r": r}
    name = {"dora": "DoRA", "conv1d": "Conv1D LoRA"}[kind]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        bwd = mode == "fwd+bwd"
        xg = x.detach().clone().requires_grad_(bwd)

        def run(fn):
            if bwd:
                return lambda: fn(xg).backward(dy)

            def inference():
                with torch.no_grad():
                    return fn(xg)
            return inference

        case = f"{mode} {name} {label} r={r} M={M}"
        t_peft = timer(run(pl))
        t_ours = timer(run(ours))
        be = _backend(device, dtype, K, r, 1, bwd)
        fl = _flops(M, K, N, r, bwd)
        base = f"peft:{name}"
        rows.append(harness.row(OP, case, base, shape, dtype, device, t_peft, flops=fl))
        rows.append(harness.row(OP, case, f"mmcore:convert_peft_model[{be}]", shape, dtype,
                                device, t_ours, flops=fl, baseline_ms=t_peft["median_ms"],
                                baseline=base))
    return rows


def _mixed(device, dtype, label, K, N, r, n_seq, S, n_adapters, timer):
    pl, ours = _pair(K, N, r, dtype, device, n_adapters=n_adapters)
    names = list(ours.adapter_names)
    x = torch.randn(n_seq, S, K, dtype=dtype, device=device)
    per_seq = [names[i % n_adapters] for i in range(n_seq)]
    ids = torch.tensor([names.index(a) for a in per_seq], device=device)
    shape = {"B": n_seq, "S": S, "K": K, "N": N, "r": r, "adapters": n_adapters}
    case = f"mixed fwd {label} r={r} {n_adapters} adapters M={n_seq * S}"
    with torch.no_grad():
        t_peft = timer(lambda: pl(x, adapter_names=per_seq))
        t_ours = timer(lambda: ours(x, adapter_ids=ids))
    be = _backend(device, dtype, K, r, n_adapters, False)
    fl = _flops(n_seq * S, K, N, r, False)
    return [harness.row(OP, case, "peft:mixed adapter_names", shape, dtype, device, t_peft,
                        flops=fl),
            harness.row(OP, case, f"mmcore:LoRALinear adapter_ids[{be}]", shape, dtype, device,
                        t_ours, flops=fl, baseline_ms=t_peft["median_ms"],
                        baseline="peft:mixed adapter_names")]


def run(quick: bool, device: str, only_converted: bool = False) -> list:
    """Rows for `mmcore bench --op lora_linear`: "mmcore x faster than peft" on the mmcore
    rows (> 1: mmcore faster), and how far above the F.linear floor they run.  quick: a
    CPU-friendly subset (BERT shape, r=16, M=128, fwd and fwd+bwd; no mixed batches)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return [harness.row(OP, "all", "peft:LoraLayer", {}, torch.float32, device, None,
                            note="peft not installed: no baseline, nothing measured")]
    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if quick:
        timer = lambda fn: harness.time_fn(fn, device, warmup=1, rep=3)  # noqa: E731
    else:
        timer = lambda fn: harness.time_fn(fn, device)  # noqa: E731
    rows = []
    Mc = (512, 2048, 8192) if cuda else (512, 2048)
    converted = [(kind, M) for kind in ("dora", "conv1d") for M in Mc]
    if only_converted:
        grid, mixed = [], []
    elif quick:
        grid = [("bert-ffn", 16, 128)]
        mixed = []
        converted = [("dora", 128)]
    else:
        Ms = (1, 512, 2048, 8192, 16384) if cuda else (1, 512, 2048)
        grid = [(lab, r, M) for lab in SHAPES for r in (8, 16, 64) for M in Ms
                if cuda or lab == "bert-ffn" or M <= 512]
        mixed = [(lab, 16, 64, 128 if cuda else 8, a) for lab in SHAPES for a in (1, 8, 64)
                 if cuda or lab == "bert-ffn"]
    for lab, r, M in grid:
        K, N = SHAPES[lab]
        rows += _single(device, dtype, lab, K, N, r, M, timer)
    for lab, r, n_seq, S, a in mixed:
        K, N = SHAPES[lab]
        rows += _mixed(device, dtype, lab, K, N, r, n_seq, S, a, timer)
    K, N = SHAPES["bert-ffn"]
    for kind, M in converted:
        rows += _converted(device, dtype, "bert-ffn", K, N, 16, M, kind, timer)
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--converted", action="store_true",
                    help="only the convert_peft_model cases (DoRA, Conv1D)")
    a = ap.parse_args()
    print(harness.markdown_table(run(a.quick, a.device, a.converted)))
