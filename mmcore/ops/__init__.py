"""mmcore.ops: the public functional API.  Only this package knows backends exist."""
from .cross_attention import cross_attention
from .lora_linear import lora_linear
from . import registry
from .registry import BACKENDS, OPS, BackendError, implementations, report, select
from .window_attention import window_attention

registry._load_backends()  # probe every backend once, outside any torch.compile trace

__all__ = ["window_attention", "cross_attention", "lora_linear", "BackendError", "BACKENDS",
           "OPS", "implementations", "report", "select"]
