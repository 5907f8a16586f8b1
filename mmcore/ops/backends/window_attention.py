"""Backends of window_attention and what each declares it can serve."""
import torch

from .. import registry
from . import _loaders
from ..reference import attention as ref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

registry.register(registry.OpImpl(
    op="window_attention", backend="torch", priority=0,
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=ref.window_fwd, backward=ref.window_bwd,
    supports_softcap=True, supports_key_bounds=True, supports_key_mask=True,
    supports_dropout=True, exact_grads=True,
))


def _unsupported(name, softcap, key_lo, key_mask):
    """Guards a direct call of a backend that does not declare a feature (the registry never
    sends one there)."""
    if softcap or key_lo is not None or key_mask is not None:
        raise ValueError(f"{name} backend: softcap / key_bounds / key_mask not supported yet")


# ------------------------------------------------------- triton (kernels/window_attention.py)
def _triton_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
                softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0, seed=None):
    from mmcore.kernels import window_attention as kern  # imported late: needs TRITON_INTERPRET
    return kern.window_attention_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal,
                                     global_tokens, scale, softcap, key_lo, key_hi, key_mask,
                                     dropout_p, seed)


def _triton_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal,
                global_tokens, scale, softcap=0.0, key_lo=None, key_hi=None, key_mask=None,
                dropout_p=0.0, seed=None):
    from mmcore.kernels import window_attention as kern
    return kern.window_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left,
                                     right, causal, global_tokens, scale, softcap, key_lo,
                                     key_hi, key_mask, dropout_p, seed)


registry.register(registry.OpImpl(
    op="window_attention", backend="triton", priority=40,
    devices=_loaders.triton_devices(), auto_devices=frozenset({"cuda"}),
    dtypes=frozenset({F16, BF16, F32}), max_head_dim=256,
    forward=_triton_fwd, backward=_triton_bwd,
    supports_gqa=True, supports_global_tokens=True,
    supports_softcap=True, supports_key_bounds=True, supports_key_mask=True,
    supports_dropout=True,  # the reference's counter-hash mask, regenerated in the kernels
    available=_loaders.triton_error,
    exact_grads=True,
))


# ---------------------------------------------------------------- cpu: csrc/cpu/window_attention.cpp
# Dropout (dropout_p, seed): the kernel regenerates reference/dropout.py's mask bit for bit,
# so its outputs equal the torch backend's for the same seed (and double backward, which runs
# the reference's backward, sees the same mask).
def _cpu_fwd(q, k, v, seqlens_q, seqlens_k, left, right, causal, global_tokens, scale,
             softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0, seed=None):
    return torch.ops.mmcore_C.window_attention_fwd(q, k, v, seqlens_q, seqlens_k, left, right,
                                                   causal, global_tokens, scale, softcap,
                                                   key_lo, key_hi, key_mask, dropout_p, seed)


def _cpu_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k, left, right, causal, global_tokens,
             scale, softcap=0.0, key_lo=None, key_hi=None, key_mask=None, dropout_p=0.0,
             seed=None):
    return torch.ops.mmcore_C.window_attention_bwd(dout, q, k, v, out, lse, seqlens_q, seqlens_k,
                                                   left, right, causal, global_tokens, scale,
                                                   softcap, key_lo, key_hi, key_mask, dropout_p,
                                                   seed)


registry.register(registry.OpImpl(
    op="window_attention", backend="cpu", priority=20,
    devices=frozenset({"cpu"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=_cpu_fwd, backward=_cpu_bwd,
    supports_softcap=True, supports_key_bounds=True, supports_key_mask=True,
    supports_dropout=True, dropout_full_speed=True,
    available=lambda: _loaders.cpp_error("window_attention_fwd"),
    exact_grads=True,
))


# ------------------------------------------------------ sdpa (PyTorch): dense and causal windows
from . import sdpa  # noqa: E402

registry.register(registry.OpImpl(
    op="window_attention", backend="sdpa", priority=50, device_priority={"cpu": 10},
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=sdpa.window_forward, backward=sdpa.window_backward,
    check=lambda p: sdpa.device_check(p) or sdpa.window_check(p),
    priority_fn=sdpa.cpu_dense_priority,
    exact_grads=False,  # its backward takes P = exp(S - lse): docs/robustness.md
))


# ------------------------------------------------------ flex (PyTorch FlexAttention): every window
from . import flex  # noqa: E402

registry.register(registry.OpImpl(
    op="window_attention", backend="flex", priority=45, auto_devices=frozenset({"cuda"}),
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32}),
    forward=flex.forward, backward=flex.backward, max_head_dim=256, check=flex.check,
    supports_softcap=True, supports_key_bounds=True, supports_key_mask=True,
    exact_grads=False,  # its backward takes P from the forward's logsumexp, like sdpa
))
