"""The project's kernels/ folder never shadows Hugging Face's `kernels` package (issue 21, item
3): from the project root (cwd and PYTHONPATH), a top-level `import kernels` is Hugging Face's
package when it is installed, and an inert placeholder that names mmcore.kernels when it is not;
`mmcore.kernels` is always the project's.  Each case runs in a fresh interpreter."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hides an installed Hugging Face `kernels` (its modules and its metadata) from this process,
# leaving the project's kernels/ findable as a top-level name: a user without HF's package.
_HIDE_HF_KERNELS = r"""
import importlib.machinery, importlib.metadata, os, sys
ROOT = os.getcwd()

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.origin == os.path.join(ROOT, "kernels", "__init__.py"):
            return spec  # the project's kernels/
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")

sys.meta_path.insert(0, _Hide())
_version = importlib.metadata.version

def _no_kernels_version(name):
    if name.lower() == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)

importlib.metadata.version = _no_kernels_version
"""


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


def _hf_kernels_installed():
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _hf_kernels_installed(),
                    reason="Hugging Face's `kernels` is not installed (transformers >= 5.2x "
                           "requires it; bootstrap installs it)")
def test_project_root_gets_hf_kernels_and_mmcore_kernels():
    out = _run(
        "import os, sys\n"
        f"ROOT = {ROOT!r}\n"
        "path = list(sys.path)\n"
        "from transformers import BertModel\n"
        "import kernels\n"
        "ours = os.path.join(ROOT, 'kernels', '__init__.py')\n"
        "assert not os.path.samefile(kernels.__file__, ours), kernels.__file__\n"
        "from kernels import get_kernel\n"  # HF's API
        "import mmcore.kernels\n"
        "assert os.path.samefile(mmcore.kernels.__file__, ours)\n"
        "assert sys.path == path, 'sys.path changed'\n"
        "print('ok', kernels.__file__)\n")
    assert out.startswith("ok ")


def test_project_root_without_hf_kernels_refuses_the_name():
    out = _run(
        _HIDE_HF_KERNELS +
        "from transformers import BertModel\n"  # transformers probes for kernels: no crash
        "import kernels\n"
        "assert kernels.__file__ is None and getattr(kernels, '__version__', None) is None\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError as e:\n"
        "    msg = str(e)\n"
        "else:\n"
        "    raise AssertionError('the placeholder served get_kernel')\n"
        "assert 'mmcore.kernels' in msg and 'pip install kernels' in msg, msg\n"
        "try:\n"
        "    import kernels.window_attention\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a top-level kernels.window_attention was served')\n"
        "import mmcore, mmcore.kernels\n"
        "assert mmcore.kernels is not kernels\n"
        "print('ok', msg)\n")
    assert out.startswith("ok ")
