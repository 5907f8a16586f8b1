"""Backends of lora_linear and what each declares it can serve.

Every backend here serves the col_scale epilogue (y = c ⊙ (x Wᵀ + LoRA) + b, DoRA) and a
weight given as the transposed view of a (K, N) matrix (Conv1D); the C++ one only when the
loaded extension has ``lora_linear_fwd_scaled`` (built from this tree's csrc).
"""
import torch

from .. import registry
from ..reference import lora as ref
from . import _loaders

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

registry.register(registry.OpImpl(
    op="lora_linear", backend="torch", priority=0,
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=ref.lora_fwd, backward=ref.lora_bwd,
    supports_col_scale=True, supports_weight_t=True,
))


# ---------------------------------------------------------------- triton (kernels/lora_linear.py)

def _triton_fwd(*args):
    from mmcore.kernels import lora_linear as K
    return K.lora_forward(*args)


def _triton_bwd(*args):
    from mmcore.kernels import lora_linear as K
    return K.lora_backward(*args)


registry.register(registry.OpImpl(
    op="lora_linear", backend="triton", priority=40,
    devices=_loaders.triton_devices(), auto_devices=frozenset({"cuda"}),
    dtypes=frozenset({F16, BF16, F32}),
    forward=_triton_fwd, backward=_triton_bwd,
    max_rank=256, supports_multi_adapter=True,
    supports_col_scale=True, supports_weight_t=True,
    available=_loaders.triton_error,
))


# ---------------------------------------------------------------- cpu (csrc/cpu/lora_linear.cpp)

def _cpu_fwd(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, col_scale=None,
             want_pre=False):
    if col_scale is None:
        return torch.ops.mmcore_C.lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling,
                                                  adapter_ids)
    y, pre = torch.ops.mmcore_C.lora_linear_fwd_scaled(x, weight, bias, lora_a, lora_b,
                                                       scaling, adapter_ids, col_scale,
                                                       want_pre)
    return (y, pre) if want_pre else y


# probed once, when the backends load (a probe calls into the dispatcher, which torch.compile
# cannot trace at dispatch time)
_SCALED_WHY = _loaders.cpp_error("lora_linear_fwd_scaled")


def _cpu_check(p):
    """col_scale / a transposed weight need an extension built from this tree's csrc."""
    if (p.extra.get("col_scale") or p.extra.get("weight_t")) and _SCALED_WHY:
        return ["the loaded mmcore._C predates lora_linear_fwd_scaled (rebuild csrc)"]
    return []


def _cpu_bwd(dy, x, weight, lora_a, lora_b, scaling, adapter_ids, need_dx, need_da, need_db):
    dx, da, db = torch.ops.mmcore_C.lora_linear_bwd(dy, x, weight, lora_a, lora_b, scaling,
                                                    adapter_ids, need_dx, need_da, need_db)
    return (dx if need_dx else None, da if need_da else None, db if need_db else None)


registry.register(registry.OpImpl(
    op="lora_linear", backend="cpu", priority=20,
    devices=frozenset({"cpu"}), dtypes=frozenset({F16, BF16, F32}),
    forward=_cpu_fwd, backward=_cpu_bwd, supports_multi_adapter=True,
    supports_col_scale=True, supports_weight_t=True, check=_cpu_check,
    available=lambda: _loaders.cpp_error("lora_linear_fwd"),
))


# ---------------------------------------------------------------- composed (PyTorch GEMMs)
from . import composed  # noqa: E402

registry.register(registry.OpImpl(
    op="lora_linear", backend="composed", priority=50, device_priority={"cpu": 10},
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=composed.forward, backward=composed.backward, supports_multi_adapter=True,
    supports_col_scale=True, supports_weight_t=True,
))
