"""Triton kernels and their launchers, imported as mmcore.kernels.

Nothing here imports the rest of mmcore.  One file per op: the @triton.jit functions and the
launchers that set grid, strides and block sizes.

This folder is the package `mmcore.kernels` (setup.py maps it; in a source tree mmcore maps it
itself).  From the project root, Python could also find it as a top-level `kernels`, which
would shadow Hugging Face's `kernels` package (a transformers dependency, also loaded by pip
through a setuptools entry point during the build).  Imported under that name, this file hands
the import over to the real `kernels` package.  If none is installed it leaves an inert
placeholder: no ``__file__``, ``__version__`` or submodules (so optional-package probes such as
transformers' ``is_kernels_available``, which import a package they find without metadata, see
it as absent instead of crashing), and any other attribute raises ImportError naming
mmcore.kernels."""
if __name__ == "kernels":  # found on sys.path as a top-level module: never serve it
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = list(_sys.path)
    _self = _sys.modules.pop("kernels")
    _sys.path[:] = [p for p in _saved if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _real = _importlib.import_module("kernels")
    except ImportError:
        _real = None
    finally:
        _sys.path[:] = _saved
    if _real is not None:
        _sys.modules["kernels"] = _real
    else:  # the inert placeholder: this module, emptied
        _sys.modules["kernels"] = _self
        _REFUSAL = (f"{_os.path.dirname(__file__)} holds mmcore's Triton kernels: import them "
                    "as mmcore.kernels (a top-level `kernels` is Hugging Face's package, which "
                    "is not installed: pip install kernels)")

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(_REFUSAL, name="kernels")

        __file__ = None
        __path__ = []
    del _importlib, _os, _sys, _root, _saved, _self, _real
