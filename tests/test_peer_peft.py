"""peft's own test suite with mmcore applied (the fast selection; the full run is
`python tests/peer/run_peft_suite.py`): no test that passes with peft alone may fail once every
peft model goes through mmcore.nn.convert_peft_model.  peft's tests come from the source
distribution of the installed peft on PyPI (downloaded once into .peer/)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")

RUNNER = os.path.join(os.path.dirname(__file__), "peer", "run_peft_suite.py")


def test_peft_suite_fast_selection_no_regression(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, RUNNER, "--fast", "--json", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert out.is_file(), f"the peer run did not finish:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    s = json.loads(out.read_text())
    assert s["regressions"] == [], r.stdout
    assert s["with_mmcore"].get("passed", 0) >= 30, s  # the selection really ran
    assert s["converted_layers"] > 0 and s["lora"]["op_calls"] > 0, s
    assert r.returncode == 0, r.stdout
