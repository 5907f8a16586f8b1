"""mmcore.nn: drop-in modules built on mmcore.ops."""
from .kv_cache import RollingKVCache

__all__ = ["RollingKVCache"]
