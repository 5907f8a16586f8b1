"""peft LoRA layers under mmcore.patch: ``mmcore.nn.convert_peft_model`` in place.

Each peft ``lora.Linear`` keeps its parameters, name and peft's whole API; only its class
becomes ``FusedLoraLinear`` (peft's class with a forward that runs ``mmcore.ops.lora_linear``
for the calls the op computes exactly, and peft's own forward for the rest: merged, disabled,
DoRA and other variants, dropout while training, a trainable base, mixed dtypes without input
casting).  ``unpatch`` restores peft's class.
"""
from __future__ import annotations

from ..nn.peft_layer import convert_peft_model, unconvert_peft_model

WHAT = ("peft lora.Linear -> FusedLoraLinear (peft's class, forward on "
        "mmcore.ops.lora_linear; peft's forward where the op cannot serve a call)")


def convert(model, backend="auto"):
    """-> (replaced, left, undo) for the report and unpatch."""
    res = convert_peft_model(model, backend=backend)
    replaced = [(n, WHAT) for n in res["converted"]]
    left = [(n, f"peft LoRA: {r}") for n, r in res["skipped"].items()]
    return replaced, left, bool(res["converted"])


def unconvert(model, undo):
    if undo:
        unconvert_peft_model(model)
