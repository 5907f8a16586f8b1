"""Helpers for the peft tests: small models peft targets, random LoRA weights."""
import torch
from torch import nn

K, N = 37, 29  # odd sizes


class Holder(nn.Module):
    """One nn.Linear named `proj` (what peft targets)."""

    def __init__(self, k=K, n=N, bias=True, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


class Toy(nn.Module):
    """A small MLP-ish model: several targets, a non-target and a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(24, 19), "v": nn.Linear(19, 24),
                                                   "norm": nn.LayerNorm(24)}) for _ in range(2))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b["norm"](x + b["v"](torch.tanh(b["q"](x))))
        return self.head(x)


def randomize(model, seed, scale=0.3):
    """Random non-zero values for every LoRA A/B (and bias) in model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


class C1Toy(nn.Module):
    """transformers' Conv1D layers (GPT-2 storage: weight (in, out)), as peft targets them."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_fc = Conv1D(19, 24).to(dtype)  # nf = 19 out, nx = 24 in
        self.c_proj = Conv1D(24, 19).to(dtype)
        self.head = nn.Linear(24, 5, dtype=dtype)
        with torch.no_grad():  # Conv1D's bias starts at 0: make it count
            self.c_fc.bias.normal_()
            self.c_proj.bias.normal_()

    def forward(self, x):
        return self.head(self.c_proj(torch.tanh(self.c_fc(x))) + x)
