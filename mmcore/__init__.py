"""mmcore: the performance core for long-document and multimodal transformers.

Sliding-window attention with global tokens, fused cross-modal attention and fused LoRA,
as Triton / C++ / CUDA kernels behind one functional API (mmcore.ops)."""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_folder(folder):
    """setup.py installs the top-level `folder` (kernels/, benchmarks/) as mmcore.<folder>; in a
    source tree (setup.py beside it) map the tree's own folder the same way, whatever else is
    installed.  (benchmarks/__init__ is a docstring: nothing runs until a benchmark module is
    imported.)"""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    path = _os.path.join(root, folder, "__init__.py")
    if not (_os.path.exists(path) and _os.path.exists(_os.path.join(root, "setup.py"))):
        return
    spec = _ilu.spec_from_file_location(f"mmcore.{folder}", path,
                                        submodule_search_locations=[_os.path.dirname(path)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules[f"mmcore.{folder}"] = mod
    spec.loader.exec_module(mod)
    globals()[folder] = mod


_map_folder("kernels")
_map_folder("benchmarks")

from .ops import cross_attention, lora_linear, window_attention  # noqa: E402
from .ops.registry import exact_gradients  # noqa: E402
from .nn.kv_cache import RollingKVCache  # noqa: E402
from . import patch  # noqa: E402  (the package, callable: mmcore.patch(model), mmcore.patch.hf_interface)
from .patch import LongContext, unpatch  # noqa: E402

__all__ = ["window_attention", "cross_attention", "lora_linear", "exact_gradients",
           "RollingKVCache", "patch", "unpatch", "LongContext", "read", "load_run", "index",
           "search", "__version__"]


def __getattr__(name):  # lazy: read / index / search without importing the model layer up front
    if name == "read":
        from .reading import read

        return read
    if name == "load_run":
        from .inference import load_run

        return load_run
    if name in ("index", "search"):
        from . import indexing

        return getattr(indexing, name)
    raise AttributeError(f"module 'mmcore' has no attribute {name!r}")
