"""Triton kernels and their launchers, imported as mmcore.kernels.

Nothing here imports the rest of mmcore.  One file per op: the @triton.jit functions and the
launchers that set grid, strides and block sizes.

This folder is the package `mmcore.kernels` (setup.py maps it; in a source tree mmcore maps it
itself).  From the project root, Python could also find it as a top-level `kernels`, which
would shadow Hugging Face's `kernels` package (a transformers dependency, also loaded by pip
through a setuptools entry point during the build).  Imported under that name, this file hands
the import over to the real `kernels` package, or refuses if none is installed."""
if __name__ == "kernels":  # found on sys.path as a top-level module: never serve it
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = list(_sys.path)
    del _sys.modules["kernels"]
    _sys.path[:] = [p for p in _saved if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _real = _importlib.import_module("kernels")
    except ImportError:
        raise ImportError(
            f"{_os.path.dirname(__file__)} holds mmcore's Triton kernels: import them as "
            "mmcore.kernels (a top-level `kernels` module is Hugging Face's package, which "
            "is not installed)", name="kernels") from None
    finally:
        _sys.path[:] = _saved
    _sys.modules["kernels"] = _real
