"""mmcore.patch(model): swap the attention and LoRA layers of Hugging Face models.

    report = mmcore.patch(model)                         # attention + peft LoRA, in place
    report = mmcore.patch(bert, long_context=mmcore.LongContext(window=256, global_tokens=1))
    mmcore.unpatch(model)                                # back to the original

``attn_implementation="mmcore"`` is registered with transformers by ``mmcore.patch.register()``,
by any ``patch()`` call, and at import of mmcore when transformers is already imported (mmcore
does not import transformers itself: it is slow to import).  After that
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="mmcore")`` works.
"""
import sys as _sys

from .families import patch, unpatch
from .long_context import LongContext
from .report import PatchReport


def register():
    """Register "mmcore" with transformers' Attention(Mask)Interface (idempotent)."""
    from .hf_interface import register as _register
    _register()


if "transformers" in _sys.modules:  # cheap then: make attn_implementation="mmcore" available
    try:
        register()
    except ImportError:  # pragma: no cover - a broken transformers install
        pass

__all__ = ["patch", "unpatch", "LongContext", "PatchReport", "register"]
