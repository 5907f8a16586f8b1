"""mmcore.nn.peft_io.load_adapter reads what peft writes and loads (peft is the oracle):
bias="all" / "lora_only" adapters (peft names a LoRA layer's bias ``<m>.base_layer.bias``),
modules_to_save copies (``<m>.modules_to_save.<p>``, ``<m>.original_module.<p>``), and a
valid adapter_model.safetensors whose header length is 128 mod 256 (its first byte is 0x80,
the first byte of a pickle: issue 16, item 11)."""
import json
import os
import struct

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

from mmcore.nn.peft_io import load_adapter  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.q = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (N, 8) -> (N, 3)
        return self.head(self.q(self.enc(x)))


def _trained_peft(tmp_path, bias, modules_to_save=("head",)):
    """A peft model whose every trainable tensor moved off its init, saved by peft."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(Tiny(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q"], bias=bias,
        modules_to_save=list(modules_to_save)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path))
    return pm.eval()


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_peft_bias_and_modules_to_save_load_like_peft(tmp_path, bias):
    pm = _trained_peft(tmp_path, bias)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    want = pm(x)
    torch.manual_seed(0)
    plain = Tiny()  # the same base weights as the peft model's
    load_adapter(plain, str(tmp_path))
    got = plain.eval()(x)
    base = Tiny().eval()(x)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _rewrite_with_header_len(path, mod):
    """Rewrite a safetensors file with its header space-padded so that len(header) % 256 ==
    mod (the format allows trailing spaces in the header)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n].rstrip(b" "), raw[8 + n:]
    json.loads(header)
    want = len(header) + ((mod - len(header)) % 256)
    while want % 8:  # safetensors aligns the data to 8 bytes
        want += 256
    header = header + b" " * (want - len(header))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return len(header)


def test_adapter_with_header_length_128_mod_256_loads(tmp_path):
    pm = _trained_peft(tmp_path, "none", modules_to_save=())
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    n = _rewrite_with_header_len(path, 128)
    with open(path, "rb") as f:
        assert f.read(1) == b"\x80" and n % 256 == 128
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    # peft itself loads the rewritten file
    torch.manual_seed(0)
    again = peft.PeftModel.from_pretrained(Tiny(), str(tmp_path)).eval()
    torch.testing.assert_close(again(x), pm(x))
    torch.manual_seed(0)
    plain = Tiny()
    load_adapter(plain, str(tmp_path))
    torch.testing.assert_close(plain.eval()(x), pm(x), rtol=1e-5, atol=1e-6)


def test_pickle_adapter_still_refused(tmp_path):
    _trained_peft(tmp_path, "none", modules_to_save=())
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    torch.save({"x": torch.ones(2)}, path)  # a zip (torch.save) under the safetensors name
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(Tiny(), str(tmp_path))
