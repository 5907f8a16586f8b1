"""Register ``attn_implementation="mmcore"`` with transformers whatever the import order.

mmcore does not import transformers (it is slow to import).  If transformers' attention
interfaces are already loaded when ``mmcore.patch`` is imported, ``register()`` runs at once;
otherwise :func:`install` puts a finder at the front of ``sys.meta_path`` that waits for the two
modules holding them (``transformers.modeling_utils``: ``AttentionInterface``,
``transformers.masking_utils``: ``AttentionMaskInterface``).  It lets the usual finders find
them, wraps their loader's ``exec_module`` and, once the second of the two has finished
executing, calls ``register()`` and removes itself.  Nothing else is imported or changed; a
failure to register is logged, never raised into the user's ``import transformers``.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("mmcore.patch")
TARGETS = ("transformers.modeling_utils", "transformers.masking_utils")


def _loaded(name) -> bool:
    """`name` in sys.modules and done executing (not mid-import)."""
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None)
    return mod is not None and not getattr(spec, "_initializing", False)


def ready() -> bool:
    """Both of transformers' interface modules are fully imported."""
    return all(_loaded(t) for t in TARGETS)


def _register():
    from .hf_interface import register
    try:
        register()
    except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
        logger.warning("mmcore: could not register attn_implementation='mmcore' with "
                       "transformers (%s: %s); call mmcore.patch.register() to see why",
                       type(e).__name__, e)


class _Finder:
    """Meta-path finder that finds nothing itself: it wraps the loaders of TARGETS."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            spec.loader = _Loader(loader)
        return spec


class _Loader:
    """Delegates to the real loader; after exec_module, registers when both TARGETS are in."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader  # the module keeps the real loader
            module.__loader__ = self._loader
        # our caller still has the module marked as initializing: check the other one only
        others = [t for t in TARGETS if t != module.__name__]
        if all(_loaded(t) for t in others):
            uninstall()
            _register()

    def __getattr__(self, name):  # get_source, get_filename, get_resource_reader, ...
        return getattr(self._loader, name)


_FINDER = _Finder()


def install():
    """Register now if transformers' interfaces are loaded, else when they are."""
    if ready():
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall():
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
