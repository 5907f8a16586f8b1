"""The `cuda` backend: hand-written CUDA kernels of csrc/cuda, where they beat Triton.

* window_attention forward for decode shapes (Sq <= 16): split-K flash-decoding with the
  query heads of a GQA group in one block (csrc/cuda/window_decode.cu).
* lora_linear forward: SGMV for multi-adapter batches and single-adapter decode
  (csrc/cuda/lora_sgmv.cu) on top of the cuBLAS base GEMM.

Forward only (backward=None: the registry refuses calls that need a gradient).  Not measured
yet, so ``auto`` never picks it (``auto_devices=frozenset()``); ask for ``backend="cuda"``, or
let a measured tuning table select it.  RollingKVCache reads its ring buffer in place through
mmcore.ops.window_decode when this backend is the one selected.
"""
import torch

from .. import registry
from . import _loaders

F16, BF16 = torch.float16, torch.bfloat16
DECODE_MAX_SQ = 16     # csrc/cuda/window_decode_plan.h kMaxSq
MAX_HEAD_DIM = 256
MAX_RANK = 128         # csrc/cuda/lora_sgmv_plan.h kMaxRank
MAX_ADAPTERS = 4096    # kMaxAdapters


def cuda_error(name: str):
    """None when mmcore_C::<name> has a CUDA kernel and an sm_80+ GPU is present, else why."""
    err = _loaders.ext_error()
    if err:
        return err
    why = []
    if torch.version.cuda is None:
        why.append("torch is a CPU build")
    elif not torch.cuda.is_available():
        why.append("no CUDA device")
    if not _loaders.has_kernel(name, "CUDA"):
        why.append("mmcore._C was built without csrc/cuda (it needs a CUDA build of torch and "
                   "nvcc at install time)")
    if not why and torch.cuda.get_device_capability() < (8, 0):
        why.append(f"sm_{''.join(map(str, torch.cuda.get_device_capability()))} < sm_80 "
                   f"(the kernels use bf16 MMA and cp.async)")
    return "; ".join(why) or None


# ---------------------------------------------------------------- window_attention (decode)

def _decode_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
                softcap=0.0, key_lo=None, key_hi=None, key_mask=None):
    _no_features(softcap, key_lo, key_mask)
    return torch.ops.mmcore_C.window_decode(q, k, v, None, None, None, None, seqlens_q,
                                            seqlens_k, 0, left, right, causal, global_tokens,
                                            scale, 0)


def _no_features(softcap, key_lo, key_mask):
    """Guards a direct call: the registry never sends these features here (not declared)."""
    if softcap or key_lo is not None or key_mask is not None:
        raise ValueError("cuda decode backend: softcap / key_bounds / key_mask not supported")


def _decode_check(p):
    why = []
    sq = p.extra.get("Sq", 0)
    if sq > DECODE_MAX_SQ:
        why.append(f"decode kernel: Sq = {sq} > {DECODE_MAX_SQ}")
    if p.head_dim % 8:
        why.append(f"head dim {p.head_dim} not a multiple of 8")
    return why


registry.register(registry.OpImpl(
    op="window_attention", backend="cuda", priority=30,
    devices=frozenset({"cuda"}), auto_devices=frozenset(), dtypes=frozenset({F16, BF16}),
    max_head_dim=MAX_HEAD_DIM, forward=_decode_fwd, backward=None,
    supports_gqa=True, supports_global_tokens=True, check=_decode_check,
    available=lambda: cuda_error("window_decode"),
))


# ---------------------------------------------------------------- lora_linear (SGMV)

def _sgmv_fwd(x, weight, bias, lora_a, lora_b, scaling, adapter_ids):
    return torch.ops.mmcore_C.lora_sgmv_fwd(x, weight, bias, lora_a, lora_b, scaling,
                                            adapter_ids, 0)


def _sgmv_check(p):
    why = []
    if p.head_dim % 8:
        why.append(f"K = {p.head_dim} not a multiple of 8")
    n = p.extra.get("N", 0)
    if n % 2:
        why.append(f"N = {n} is odd")
    if p.adapters > MAX_ADAPTERS:
        why.append(f"{p.adapters} adapters > {MAX_ADAPTERS}")
    return why


registry.register(registry.OpImpl(
    op="lora_linear", backend="cuda", priority=30,
    devices=frozenset({"cuda"}), auto_devices=frozenset(), dtypes=frozenset({F16, BF16}),
    forward=_sgmv_fwd, backward=None, max_rank=MAX_RANK, supports_multi_adapter=True,
    check=_sgmv_check, available=lambda: cuda_error("lora_sgmv_fwd"),
))


if _loaders.ext_error() is None:
    from ..window_decode import _register_fakes

    _register_fakes()
