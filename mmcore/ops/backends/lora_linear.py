"""Backends of lora_linear and what each declares it can serve."""
import torch

from .. import registry
from ..reference import lora as ref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

registry.register(registry.OpImpl(
    op="lora_linear", backend="torch", priority=0,
    devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({F16, BF16, F32, F64}),
    forward=ref.lora_fwd, backward=ref.lora_bwd,
))
