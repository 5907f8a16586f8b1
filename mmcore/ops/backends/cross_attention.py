"""Backends of cross_attention and what each declares it can serve."""
import torch

from .. import registry
from ..reference import attention as ref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

registry.register(registry.OpImpl(
    op="cross_attention", backend="torch", priority=0,
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=ref.cross_fwd, backward=ref.cross_bwd, supports_softcap=True,
    supports_dropout=True, exact_grads=True,
))


def _unsupported(name, softcap):
    """Guards a direct call (the registry never sends softcap to a backend not declaring it)."""
    if softcap:
        raise ValueError(f"{name} backend: softcap not supported yet")

# ----------------------------------------------------------------------------- triton
from . import _loaders  # noqa: E402


def _triton_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap=0.0, dropout_p=0.0, seed=None):
    from mmcore.kernels import cross_attention as K
    return K.cross_attention_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap,
                                 dropout_p=dropout_p, seed=seed)


def _triton_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap=0.0,
                dropout_p=0.0, seed=None):
    from mmcore.kernels import cross_attention as K
    return K.cross_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap,
                                 dropout_p, seed)


registry.register(registry.OpImpl(
    op="cross_attention", backend="triton", priority=40,
    devices=_loaders.triton_devices(), dtypes=frozenset({F16, BF16, F32}),
    forward=_triton_fwd, backward=_triton_bwd, max_head_dim=256, supports_softcap=True,
    supports_dropout=True,  # the reference's counter-hash mask, regenerated in the kernels
    available=_loaders.triton_error, auto_devices=frozenset({"cuda"}),
    exact_grads=True,
))


# ----------------------------------------------------------------------------- cpu (C++)


# Dropout: reference/dropout.py's mask bit for bit (csrc/cpu/common.h: Dropout).
def _cpu_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap=0.0, dropout_p=0.0, seed=None):
    return torch.ops.mmcore_C.cross_attention_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap,
                                                  dropout_p, seed)


def _cpu_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap=0.0, dropout_p=0.0,
             seed=None):
    return torch.ops.mmcore_C.cross_attention_bwd(dout, q, k, v, out, lse, seqlens_q,
                                                  seqlens_k, scale, softcap, dropout_p, seed)


registry.register(registry.OpImpl(
    op="cross_attention", backend="cpu", priority=20,
    devices=frozenset({"cpu"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=_cpu_fwd, backward=_cpu_bwd, supports_softcap=True, supports_dropout=True, dropout_full_speed=True,
    available=lambda: _loaders.cpp_error("cross_attention_fwd"),
    exact_grads=True,
))


# ----------------------------------------------------------------------------- sdpa (PyTorch)
from . import sdpa  # noqa: E402


def _sdpa_fwd(q, k, v, seqlens_q, seqlens_k, scale, softcap=0.0):
    _unsupported("sdpa", softcap)
    return sdpa.forward(q, k, v, seqlens_q, seqlens_k, False, scale)


def _sdpa_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, scale, softcap=0.0):
    _unsupported("sdpa", softcap)
    return sdpa.backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, False, scale)


registry.register(registry.OpImpl(
    op="cross_attention", backend="sdpa", priority=50, device_priority={"cpu": 10},
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=_sdpa_fwd, backward=_sdpa_bwd, check=sdpa.device_check,
    exact_grads=False,  # its backward takes P = exp(S - lse): docs/robustness.md
))
