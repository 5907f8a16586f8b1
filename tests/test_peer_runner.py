"""tests/peer/run_hf_models.py (the runner of transformers' own model tests with and without
mmcore) on a small fake checkout written here: transformers' model tests themselves are not
available offline, so CI checks the runner -- outcomes per mode, regressions vs. the listed
expected differences, the attention counters read from a real tiny model patched by the plugin,
the version-gap stand-ins, the timeout, bad command lines.  The full command is documented in
docs/huggingface.md."""
import json
import os
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peer"))
import run_hf_models as rhm  # noqa: E402

FAKE_TESTS = '''
import os
import unittest

import pytest
import torch
from transformers.testing_utils import _MMCORE_PEER_FAKE_CONSTANT, _mmcore_peer_fake_function

MODE = os.environ["MMCORE_PEER_MODE"]


def test_passes():
    assert 1 + 1 == 2


def test_breaks_with_mmcore():
    assert MODE == "base", "broken by mmcore (fake)"


def test_sdpa_can_dispatch_composite_models():
    assert MODE == "base", "implementation is named mmcore"


def test_fixed_by_mmcore():
    assert MODE == "mmcore"


class FakeModelTest(unittest.TestCase):
    def test_subtest_breaks_with_mmcore(self):  # the test passes, one of its subtests fails
        for i in range(3):
            with self.subTest(i=i):
                self.assertTrue(i != 1 or MODE == "base", "subtest broken by mmcore (fake)")


@pytest.mark.skip(reason="skipped in both")
def test_skipped():
    pass


def test_version_gap_stand_ins():
    assert _MMCORE_PEER_FAKE_CONSTANT == {"a": [1, 2]}
    with pytest.raises(NotImplementedError, match="another version"):
        _mmcore_peer_fake_function()


def test_tiny_llama_with_padding():
    """A real model: built with sdpa, patched by the plugin in mmcore mode."""
    import torch
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1,
                      attn_implementation="sdpa")
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()

'''

TESTING_UTILS = '''
_MMCORE_PEER_FAKE_CONSTANT = {"a": [1, 2]}


def _mmcore_peer_fake_function():
    return 1
'''


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(rhm, "TEST_DEPS", {})  # nothing to pip-install for the fake tests
    tests = tmp_path / "tests"
    (tests / "models" / "mistral").mkdir(parents=True)
    (tests / "test_modeling_common.py").write_text("# marker: a transformers tests/ tree\n")
    (tests / "models" / "mistral" / "test_modeling_mistral.py").write_text(
        textwrap.dedent(FAKE_TESTS))
    src = tmp_path / rhm.SRC_COPY / "transformers"
    src.mkdir(parents=True)
    (src / "testing_utils.py").write_text(TESTING_UTILS)
    (tmp_path / "SOURCE").write_text("fake checkout of test_peer_runner.py\n")
    return tmp_path


def test_runner_reports_regressions_expected_differences_and_attention_calls(checkout, tmp_path,
                                                                               capsys):
    out = tmp_path / "summary.json"
    rc = rhm.main(["mistral", "--tests-dir", str(checkout), "--json", str(out),
                   "--timeout", "300"])
    text = capsys.readouterr().out
    s = json.loads(out.read_text())
    fam = s["families"][0]
    assert rc == 1, text  # regressions
    ids = lambda rows: [r["test"].rsplit("::", 1)[-1] for r in rows]  # noqa: E731
    assert ids(fam["regressions"]) == ["test_subtest_breaks_with_mmcore",
                                       "test_breaks_with_mmcore"]
    assert "subtest broken by mmcore (fake)" in fam["regressions"][0]["error"]
    assert "broken by mmcore (fake)" in fam["regressions"][1]["error"]
    assert ids(fam["expected_different"]) == ["test_sdpa_can_dispatch_composite_models"]
    assert [n.rsplit("::", 1)[-1] for n in fam["pass_only_with_mmcore"]] == [
        "test_fixed_by_mmcore"]
    assert fam["base"]["passed"] == 6 and fam["base"]["failed"] == 1
    assert fam["base"]["skipped"] == 1
    assert fam["mmcore"]["passed"] == 4 and fam["mmcore"]["failed"] == 3
    # the tiny Llama was patched in mmcore mode and its attention calls counted
    att = fam["attention"]
    assert fam["mmcore"]["patched_models"] >= 1
    assert att["op_calls"] + att["fallback_calls"] == 2  # 2 layers, one forward
    assert s["version_gap"] == {"transformers.testing_utils": {
        "_MMCORE_PEER_FAKE_CONSTANT": {"a": [1, 2]}, "_mmcore_peer_fake_function": None}}
    assert s["tests_source"] == "fake checkout of test_peer_runner.py"
    assert "REGRESSION " in text and "test_breaks_with_mmcore" in text
    assert "test_sdpa_can_dispatch_composite_models" not in text.split("REGRESSION", 1)[1]
    # the saved summary re-rendered as Markdown, without running anything
    assert rhm.main(["--from-json", str(out), "--markdown"]) == 1
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| family | base p/f/s | mmcore p/f/s | regr |")
    assert md[2].startswith("| mistral | 6/1/1 | 4/3/1 | 2 |")


# (text config, vision config) -> which attention the plugin hands to mmcore in mmcore mode
PER_SUB_MODEL = [("eager", "sdpa"), ("sdpa", "eager"), ("sdpa", "sdpa"), ("eager", "eager")]


@pytest.mark.parametrize("name", ["gemma3", "mllama"])
@pytest.mark.parametrize("text, vision", PER_SUB_MODEL)
def test_plugin_patches_only_the_sdpa_sub_models(name, text, vision, monkeypatch):
    """The plugin's rule per sub-model of a composite model: the sub-models built on sdpa are
    patched (their attention configs become "mmcore"), the eager ones stay eager (configs and
    modules); all sdpa -> the whole model is patched, all eager -> nothing."""
    import kit_vlm
    import mmcore_hf_plugin as plugin
    from transformers import PreTrainedModel

    from mmcore.patch import families, hf_interface
    monkeypatch.setattr(PreTrainedModel, "post_init", PreTrainedModel.post_init)  # restored
    monkeypatch.setattr(plugin, "_patched", {"models": 0, "eager_parts_left": 0})
    plugin._install_mmcore()
    cfg, cls = kit_vlm.config(name)
    cfg._attn_implementation = {"text_config": text, "vision_config": vision}
    model = cls(cfg)
    want = {"text_config": text, "vision_config": vision}
    for key, impl in want.items():
        sub = getattr(model.config, key)
        assert sub._attn_implementation == ("mmcore" if impl == "sdpa" else "eager"), key
        mods = [m for _, m in model.named_modules()
                if "Attention" in type(m).__name__ and getattr(m, "config", None) is sub]
        assert mods, key
        assert all((hf_interface.STATS_ATTR in m.__dict__) == (impl == "sdpa") for m in mods)
    # all sdpa: one patch of the whole composite (its inner PreTrainedModel, at its post_init)
    whole = [m for m in model.modules() if getattr(m, families._STATE_ATTR, None) is not None
             and {"vision_tower", "vision_model"} & set(dict(m.named_children()))]
    assert bool(whole) == (text == vision == "sdpa")
    assert (plugin._patched["models"] > 0) == ("sdpa" in (text, vision))
    # counted: the models left partly eager (the top config is sdpa in all four cases)
    assert (plugin._patched["eager_parts_left"] > 0) == ("eager" in (text, vision))


def test_plugin_interleaved_configs_patched_module_by_module():
    """Attention of an sdpa config interleaved with an eager one (no sub-module holds only the
    sdpa ones): each sdpa attention module is patched alone, the eager one is not."""
    import mmcore_hf_plugin as plugin
    from torch import nn
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    def cfg(impl):
        c = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
        c._attn_implementation = impl
        return c
    sdpa, eager = cfg("sdpa"), cfg("eager")
    model = nn.Module()
    model.layers = nn.ModuleList([LlamaAttention(sdpa, 0), LlamaAttention(eager, 1),
                                  LlamaAttention(sdpa, 2)])
    targets = plugin.patch_targets(model)
    assert [id(t) for t in targets] == [id(model.layers[0]), id(model.layers[2])]
    model.layers = model.layers[::2]  # no eager one left: the whole model
    assert plugin.patch_targets(model) == [model]


def test_runner_base_mode_alone_has_no_attention_counts(checkout, capsys):
    rc = rhm.main(["mistral", "--tests-dir", str(checkout / "tests"), "--modes", "base",
                   "-k", "passes or tiny_llama"])
    text = capsys.readouterr().out
    assert rc == 0
    row = [ln for ln in text.splitlines() if ln.startswith("mistral")][0].split()
    assert row[1] == "2/0/0" and row[2] == "-"


def test_timeout_keeps_the_outcomes_so_far(checkout):
    tests = rhm.resolve_tests_dir(str(checkout))
    with open(rhm.test_file(tests, "mistral"), "w") as f:  # no transformers import: starts fast
        f.write("import time\n\ndef test_a():\n    pass\n\n"
                "def test_b():\n    time.sleep(600)\n")
    res = rhm.run_family(tests, "mistral", "base", timeout=30)
    assert res["status"] == "timeout"
    assert res["outcomes"] == {"tests/models/mistral/test_modeling_mistral.py::test_a": "passed"}


def test_compare_counts_only_tests_run_in_both_modes():
    base = {"outcomes": {"a::test_x": "passed", "a::test_y": "passed",
                         "a::test_sdpa_can_dispatch_non_composite_models": "passed"}}
    mm = {"outcomes": {"a::test_x": "failed",
                       "a::test_sdpa_can_dispatch_non_composite_models": "failed"}}
    assert rhm.compare(base, mm) == (
        ["a::test_x"], ["a::test_sdpa_can_dispatch_non_composite_models"], [])


@pytest.mark.parametrize("argv, message", [
    (["nosuchfamily"], "unknown family 'nosuchfamily'"),
    (["--modes", "base,fast"], "--modes"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--from-git", "/tmp"], "--from-git and --rev go together"),
    (["--tests-dir", "/nonexistent/checkout"], "no test_modeling_common.py"),
    (["--from-json", __file__], "not a summary of this script"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys):
    rc = rhm.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1



def test_plugin_forced_default_patches_only_eager_that_was_not_asked_for(monkeypatch):
    """MMCORE_PEER_FORCE=default (Gemma-2: no SDPA, so transformers picks "eager"): a model
    built with no implementation asked for is patched; one built with attn_implementation=
    "eager", or from a config on which "eager" was set (test_attention_outputs sets it, then
    config.output_attentions, which transformers allows on "eager" only), stays eager."""
    import kit_patch as K
    import mmcore_hf_plugin as plugin
    from transformers import PreTrainedConfig, PreTrainedModel

    for cls, name in ((PreTrainedModel, "post_init"),
                      (PreTrainedModel, "_check_and_adjust_attn_implementation"),
                      (PreTrainedConfig, "_attn_implementation")):  # restored afterwards
        monkeypatch.setattr(cls, name, cls.__dict__[name])
    monkeypatch.setattr(plugin, "_patched", {"models": 0, "eager_parts_left": 0})
    monkeypatch.setattr(plugin, "_FORCE_DEFAULT", True)
    monkeypatch.setattr(plugin, "_DEFAULT_EAGER", {})
    plugin._install_mmcore()
    cfg, cls, _ = K.build("gemma2")
    assert cls(cfg).config._attn_implementation == "mmcore"  # eager by default: patched
    assert cls(cfg).config._attn_implementation == "mmcore"  # same config, built again
    cfg2, _, _ = K.build("gemma2")
    assert cls._from_config(cfg2, attn_implementation="eager").config._attn_implementation \
        == "eager"
    cfg3, _, _ = K.build("gemma2")
    cls(cfg3)
    cfg3._attn_implementation = "eager"  # asked for: no longer a default
    cfg3.output_attentions = True
    m = cls(cfg3)
    assert m.config._attn_implementation == "eager" and plugin._patched["models"] == 2
    with torch.no_grad():
        out = m(torch.randint(3, K.V, (1, 7)))
    assert len(out.attentions) == 2
