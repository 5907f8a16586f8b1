"""mmcore.nn: drop-in modules built on mmcore.ops."""
from .cross_modal import CoAttention, CrossModalAttention
from .kv_cache import RollingKVCache
from .lora import (LoRALinear, adapter_batch, add_lora, disable_adapters, lora_modules,
                   merge_adapters, set_adapter, unmerge_adapters)
from .peft_io import load_adapter, save_adapter
from .peft_layer import convert_peft_model, unconvert_peft_model

__all__ = ["CoAttention", "CrossModalAttention", "RollingKVCache", "LoRALinear", "add_lora",
           "set_adapter", "disable_adapters", "adapter_batch", "merge_adapters",
           "unmerge_adapters", "lora_modules", "load_adapter", "save_adapter",
           "convert_peft_model", "unconvert_peft_model"]
