"""The transformers / peft versions mmcore supports, as stated once in requirements-hf.txt (the
package's extra "hf"), and a one-time warning when the installed ones fall outside."""
from __future__ import annotations

import importlib.metadata
import logging

logger = logging.getLogger("mmcore.patch")
LIBRARIES = ("transformers", "peft")
_CHECKED: set = set()


def supported() -> dict:
    """{library: specifier string} from mmcore's installed metadata (extra "hf"), e.g.
    {"transformers": ">=5.17,<5.26", "peft": ">=0.18,<0.23"}; {} when unknown."""
    try:
        from packaging.requirements import Requirement
        reqs = importlib.metadata.requires("mmcore") or []
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return {}
    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.name in LIBRARIES and r.marker is not None and "hf" in str(r.marker):
            out[r.name] = str(r.specifier)
    return out


def check(library: str) -> bool:
    """Warn once if the installed `library` is outside the supported range; -> in range."""
    spec = supported().get(library)
    try:
        from packaging.specifiers import SpecifierSet
        version = importlib.metadata.version(library)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return True
    ok = spec is None or SpecifierSet(spec).contains(version, prereleases=True)
    if not ok and library not in _CHECKED:
        _CHECKED.add(library)
        logger.warning("mmcore supports %s%s (requirements-hf.txt); %s %s is installed: "
                       "untested, outputs are still checked per call but HF internals mmcore "
                       "reads may have changed", library, spec, library, version)
    return ok
