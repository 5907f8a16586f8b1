"""Importing mmcore without its compiled extension says what is missing and how to build it,
and the PyTorch backends keep serving (issue 11, item 6)."""
import os
import shutil
import subprocess
import sys

import pytest

from mmcore.ops.backends._loaders import explain_ext_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = "pip install --no-build-isolation --use-pep517 -e ."
_USE = ("import torch, mmcore\n"
        "q = torch.randn(1, 2, 40, 16)\n"
        "out = mmcore.window_attention(q, q, q, window=(4, 4))\n"
        "y = mmcore.lora_linear(torch.randn(3, 8), torch.randn(5, 8), None, torch.randn(2, 8),"
        " torch.randn(5, 2), 1.0)\n"
        "print('served', tuple(out.shape), tuple(y.shape))\n")


def _tree_without_extension(tmp):
    """Run _USE in a copy of the source tree (mmcore/, kernels/, setup.py) without mmcore._C."""
    ignore = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__")
    shutil.copytree(os.path.join(ROOT, "mmcore"), tmp / "mmcore", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), tmp / "kernels", ignore=ignore)
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp / "setup.py")
    # -S: no .pth files, so an editable install of this checkout cannot supply its _C
    paths = [str(tmp)] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.run([sys.executable, "-S", "-c", _USE], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def test_absent_extension_says_not_built_and_how(tmp_path):
    r = _tree_without_extension(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "served (1, 2, 40, 16) (3, 5)" in r.stdout
    assert "mmcore._C is not built" in r.stderr and BUILD in r.stderr, r.stderr
    assert "./bootstrap.sh" in r.stderr
    assert "circular import" not in r.stderr
    assert r.stderr.count("mmcore._C is not built") == 1  # once, not per call


def test_broken_extension_says_rebuild(tmp_path):
    msg = explain_ext_error(ImportError("/x/_C.so: invalid ELF header"), _fake_tree(tmp_path))
    assert "could not be loaded (ImportError: /x/_C.so: invalid ELF header)" in msg
    assert BUILD in msg


def _fake_tree(tmp):
    import importlib.machinery

    (tmp / "mmcore").mkdir()
    (tmp / "mmcore" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    (tmp / "setup.py").write_text("")
    return str(tmp / "mmcore")


@pytest.mark.parametrize("err", ["undefined symbol: _ZN3c1017RegisterOperatorsD1Ev",
                                 "module compiled against ABI version 0x1000009"])
def test_stale_extension_names_the_torch(tmp_path, err):
    import torch

    msg = explain_ext_error(ImportError(err), _fake_tree(tmp_path))
    assert "was built against another torch than this one" in msg and err[:20] in msg
    assert f"this torch ({torch.__version__})" in msg and BUILD in msg
