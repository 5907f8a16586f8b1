"""mmcore.patch(model): swap the attention and LoRA layers of Hugging Face models.

    report = mmcore.patch(model)                         # attention + peft LoRA, in place
    report = mmcore.patch(bert, long_context=mmcore.LongContext(window=256, global_tokens=1))
    mmcore.unpatch(model)                                # back to the original
    mmcore.patch.hf_interface.STATS                      # the submodules, as usual

``mmcore.patch`` is this package, and calling it calls :func:`mmcore.patch.patch` (the module's
class has a ``__call__``), so both the call and the submodules work.

``attn_implementation="mmcore"`` is registered with transformers whatever the import order:
at import of mmcore if transformers' attention interfaces are already loaded, else as soon as
they are (``mmcore.patch.autoregister``: mmcore does not import transformers itself, it is slow
to import).  ``register()`` does it explicitly, and any ``patch()`` call does it too.  After
that ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="mmcore")`` works.
"""
import inspect as _inspect
import sys as _sys
import types as _types

from . import autoregister
from .families import patch, unpatch
from .long_context import LongContext
from .report import PatchReport


def register():
    """Register "mmcore" with transformers' Attention(Mask)Interface (idempotent)."""
    from .hf_interface import register as _register
    _register()


class _CallableModule(_types.ModuleType):
    """The package's class: ``mmcore.patch(model, ...)`` is ``mmcore.patch.patch(model, ...)``."""

    def __call__(self, *args, **kwargs):
        return self.patch(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(patch)  # what help() / inspect show for the call
__doc__ += "\nThe call, mmcore.patch(model, ...):\n\n" + _inspect.cleandoc(patch.__doc__ or "")

autoregister.install()

__all__ = ["patch", "unpatch", "LongContext", "PatchReport", "register"]
