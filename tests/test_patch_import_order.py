"""attn_implementation="mmcore" works whatever the import order of mmcore and transformers
(issue 23, item 4), and mmcore.patch is both the call and the package (mmcore.patch(model),
mmcore.patch.hf_interface).  Import order is tested in fresh interpreters."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import mmcore
from kit import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_USE = """
import sys
from transformers import AutoModel, BertConfig
import torch
cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=37, max_position_embeddings=64)
m = AutoModel.from_config(cfg, attn_implementation="mmcore").eval()
assert m.config._attn_implementation == "mmcore", m.config._attn_implementation
with torch.no_grad():
    m(torch.randint(0, 97, (2, 12)), attention_mask=torch.ones(2, 12, dtype=torch.long))
st = mmcore.patch.hf_interface.STATS
assert st.op_calls == 1 and st.fallback_calls == 0, vars(st)
assert not any(type(f).__module__ == "mmcore.patch.autoregister" for f in sys.meta_path)
print("ok")
"""

ORDERS = {
    "mmcore_first": "import sys\nimport mmcore\n"
                    "assert 'transformers' not in sys.modules, 'mmcore imported transformers'\n"
                    "import transformers\n",
    "transformers_first": "import transformers\nimport mmcore\n",
    "models_loaded_first": "from transformers import AutoModel\nimport mmcore\n",
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_attn_implementation_mmcore_any_import_order(order):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", ORDERS[order] + _USE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_patch_is_callable_and_the_package():
    import mmcore.patch.hf_interface as hfi
    from transformers import BertConfig, BertModel

    assert mmcore.patch.hf_interface is hfi
    assert isinstance(mmcore.patch.hf_interface.STATS, hfi.CallStats)
    assert mmcore.patch.LongContext is mmcore.LongContext
    assert mmcore.patch.patch is not mmcore.patch  # the function, inside the package
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64,
                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    m = BertModel(cfg).eval()
    ids = torch.randint(0, 97, (1, 10))
    oracle = copy.deepcopy(m).double()
    with torch.no_grad():
        base = m(ids).last_hidden_state  # unpatched fp32
        want = oracle(ids).last_hidden_state  # fp64
    before = hfi.STATS.op_calls
    rep = mmcore.patch(m)  # the package, called
    assert rep.replaced, rep
    with torch.no_grad():
        got = m(ids).last_hidden_state
    assert hfi.STATS.op_calls == before + 1
    assert_close("patched output", got, want, base)
    mmcore.unpatch(m)
    from mmcore import patch

    assert patch is mmcore.patch and callable(patch)
    import inspect
    assert "long_context" in inspect.signature(mmcore.patch).parameters
