"""Eager fast path: the same forward/backward as the torch.library custom ops, without the
custom-op dispatch machinery (about 0.1-0.3 ms of host time per call, which adds up over the
layers of a model).  Used only for plain tensors outside torch.compile / export / any
dispatch mode; everything else goes through the registered custom ops."""
from __future__ import annotations

import torch


def plain(*tensors) -> bool:
    """True when the call can skip the custom op: eager mode, no tracing, plain tensors."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def needs_grad(*tensors) -> bool:
    """True when autograd has to record the call (else the forward runs bare: no
    autograd.Function, no saved tensors -- inference and decoding pay less host time)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def function(name, fwd_impl, bwd_impl, setup, backward):
    """An autograd.Function running fwd_impl, saving with `setup(ctx, inputs, output)` and
    differentiating with `backward(ctx, *grads, bwd=bwd_impl)` — the custom op's own hooks."""

    def forward(ctx, *inputs):
        out = fwd_impl(*inputs)
        setup(ctx, inputs, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads, bwd=bwd_impl)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(bwd)})
