"""peft LoRA layers under mmcore.patch: ``mmcore.nn.convert_peft_model`` in place.

Each peft ``lora.Linear`` (on an ``nn.Linear`` or a transformers ``Conv1D``) keeps its
parameters, name, repr and peft's whole API; only its class becomes ``FusedLoraLinear``
(peft's class with a forward that runs ``mmcore.ops.lora_linear`` for the calls the op
computes exactly -- plain LoRA, ``lora_bias``, DoRA through the op's col_scale epilogue -- and
peft's own forward for the rest: merged, disabled, other variants, dropout while training, a
trainable base, mixed dtypes without input casting).  The report names each converted layer
with its kinds.  ``unpatch`` restores peft's class.
"""
from __future__ import annotations

from ..nn.peft_layer import convert_peft_model, layer_kinds, unconvert_peft_model

WHAT = ("peft lora.Linear -> FusedLoraLinear (peft's class, forward on "
        "mmcore.ops.lora_linear; peft's forward where the op cannot serve a call)")


def convert(model, backend="auto"):
    """-> (replaced, left, undo) for the report and unpatch."""
    res = convert_peft_model(model, backend=backend)
    mods = dict(model.named_modules())
    replaced = [(n, f"{WHAT} [{', '.join(layer_kinds(mods[n]))}]") for n in res["converted"]]
    left = [(n, f"peft LoRA: {r}") for n, r in res["skipped"].items()]
    return replaced, left, bool(res["converted"])


def unconvert(model, undo):
    if undo:
        unconvert_peft_model(model)
