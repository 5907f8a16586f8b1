"""pytest plugin for peft's own test suite (loaded with ``-p mmcore_peft_plugin`` by
``tests/peer/run_peft_suite.py``; not collected by mmcore's own test run).

Environment:
  MMCORE_PEER_MMCORE  "1": every peft model that ``get_peft_model`` / ``PeftModel.from_pretrained``
                      return goes through ``mmcore.nn.convert_peft_model``; "0": peft as is.
  MMCORE_PEER_SELECT  "full": every test of the LoRA cases mmcore converts (CASES: nn.Linear and
                      transformers Conv1D targets, plain LoRA, DoRA, lora_bias) in
                      TestPeftCustomModel, TestPeftCustomModel's tests parametrised by
                      LoraConfig alone, and the LoRA tests of the classes in CLASSES (repr,
                      multiple active adapters, mixed adapter batches, requires_grad, ...);
                      "fast": the test functions in FAST of the FAST_CASES; "all": the whole
                      file (about 24,800 tests, every peft method).
  MMCORE_PEER_ONLY    a JSON file listing node ids: run only those.
  MMCORE_PEER_OUT     a JSON file: {"outcomes": {nodeid: outcome}, "lora": {...op / fallback counts,
                      "kind_calls": op calls per kind}, "converted_models": n,
                      "converted_layers": n, "converted_kinds": {kind: layers}} (kinds:
                      "Linear" / "Conv1D" bases, layers with a "lora_bias" / "DoRA" adapter).

peft's source distribution ships neither ``tests/__init__.py`` nor its conftest; the runner adds
an empty ``__init__.py``.  ``diffusers`` and ``datasets`` are imported at module level by peft's
test helpers but used by none of the selected tests: when they are not installed an import stub
stands in (any use of it raises).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import types

import pytest

# TestPeftCustomModel's LoRA cases with an nn.Linear or Conv1D target (what mmcore converts)
CASES = {f"Vanilla MLP {i} LoRA" for i in range(1, 7)} | {
    f"Vanilla MLP {i} LoRA with DoRA" for i in (7, 8, 9)} | {
    "Vanilla MLP 1 LoRA with lora_b bias",
    "Embedding + transformers Conv1D 1 LoRA", "Embedding + transformers Conv1D 3 LoRA",
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
    "Embedding + transformers Conv1D 1 DoRA", "Embedding + transformers Conv1D 3 DoRA",
    "Conv2d 2 LoRA", "Conv2d 2 LoRA with DoRA", "Conv3d 2 LoRA", "Conv3d 2 LoRA with DoRA",
}
# other classes whose LoRA tests (node id mentions LoRA / lora / LoraConfig) are selected
CLASSES = {"TestLayerRepr", "TestMultipleActiveAdapters", "TestMixedAdapterBatches",
           "TestRequiresGrad", "TestDynamicDispatch", "TestMultiRankAdapter"}
# the fast selection (CI): saving, loading, adding / deleting / switching adapters, disabling,
# merging, training -- the APIs that broke when peft layers were swapped out -- on the cases
# with two targets, with modules_to_save, and with dropout
FAST = {
    "test_save_pretrained", "test_save_load_roundtrip", "test_parameters_after_loading_model",
    "test_load_multiple_adapters", "test_active_adapter", "test_delete_adapter",
    "test_disable_adapters", "test_disable_adapters_with_merging",
    "test_merge_layers_is_idempotent", "test_training_custom_models",
    "test_only_params_are_updated", "test_forward_bfloat16",
}
FAST_CASES = {"Vanilla MLP 4 LoRA", "Vanilla MLP 5 LoRA", "Vanilla MLP 6 LoRA",
              "Vanilla MLP 8 LoRA with DoRA", "Vanilla MLP 1 LoRA with lora_b bias",
              "Embedding + transformers Conv1D 1 LoRA"}
# MMCORE_PEER_ONLY: a file of node ids to run (the runner's rerun of failures without mmcore)
_ONLY = os.environ.get("MMCORE_PEER_ONLY")

_ON = os.environ.get("MMCORE_PEER_MMCORE", "0") == "1"
_SELECT = os.environ.get("MMCORE_PEER_SELECT", "full")
_OUT = os.environ.get("MMCORE_PEER_OUT")
_outcomes: dict = {}
_counts = {"converted_models": 0, "converted_layers": 0, "converted_kinds": {}}


def _stub(name, attrs):
    mod = types.ModuleType(name)
    mod.__dict__["__mmcore_stub__"] = True

    def unavailable(*a, **k):
        raise ImportError(f"{name} is not installed (import stub of mmcore's peer-suite runner)")
    for a in attrs:
        setattr(mod, a, type(a, (), {"__init__": unavailable, "from_pretrained":
                                     staticmethod(unavailable)}) if a[0].isupper()
                else unavailable)
    sys.modules[name] = mod


for _name, _attrs in (("diffusers", ["StableDiffusionPipeline"]), ("datasets", ["load_dataset"])):
    if importlib.util.find_spec(_name) is None:
        _stub(_name, _attrs)


def _convert(model):
    from mmcore.nn import convert_peft_model
    rep = convert_peft_model(model)
    _counts["converted_models"] += 1
    _counts["converted_layers"] += len(rep["converted"])
    kinds = _counts["converted_kinds"]
    for k, n in rep.get("kinds", {}).items():
        kinds[k] = kinds.get(k, 0) + n
    return model


def _wrap_mmcore():
    import peft
    import peft.mapping_func as mf
    from peft import PeftModel

    real_get = mf.get_peft_model

    @functools.wraps(real_get)
    def get_peft_model(*a, **k):
        return _convert(real_get(*a, **k))
    mf.get_peft_model = get_peft_model
    peft.get_peft_model = get_peft_model

    real_from = PeftModel.__dict__["from_pretrained"].__func__

    @functools.wraps(real_from)
    def from_pretrained(cls, *a, **k):
        return _convert(real_from(cls, *a, **k))
    PeftModel.from_pretrained = classmethod(from_pretrained)


def pytest_configure(config):
    if _ON:
        _wrap_mmcore()
        stats = _stats()
        if stats is not None:
            stats.reset()
            _kind_calls().clear()


def _stats():
    """mmcore's LoRA call counters (None for an mmcore that has none, e.g. an older checkout)."""
    try:
        from mmcore.nn.peft_layer import STATS
    except ImportError:
        return None
    return STATS


def _kind_calls() -> dict:
    """op calls per kind ("Conv1D", "lora_bias", "DoRA"), {} for an mmcore without them."""
    try:
        from mmcore.nn.peft_layer import KIND_CALLS
    except ImportError:
        return {}
    return KIND_CALLS


def _selected(it) -> bool:
    cs = getattr(it, "callspec", None)
    params = cs.params if cs is not None else {}
    name = params.get("test_name")
    cls = it.cls.__name__ if it.cls is not None else None
    if _SELECT == "all":
        return True
    if _SELECT == "fast":
        return cls == "TestPeftCustomModel" and it.originalname in FAST and name in FAST_CASES
    if cls == "TestPeftCustomModel":
        if name is not None:
            return name in CASES
        return "[LoraConfig]" in it.nodeid  # parametrised by the config class alone
    low = it.nodeid.lower()
    return cls in CLASSES and ("lora" in low or "dora" in low)


def pytest_collection_modifyitems(config, items):
    only = set()
    if _ONLY is not None:
        with open(_ONLY) as f:
            only = set(json.load(f))
    keep, drop = [], []
    for it in items:
        ok = _selected(it)
        if _ONLY is not None:
            ok = it.nodeid in only
        (keep if ok else drop).append(it)
    items[:] = keep
    if drop:
        config.hook.pytest_deselected(items=drop)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        out = report.outcome
        if hasattr(report, "wasxfail"):
            out = "xfailed" if report.skipped else "xpassed"
        _outcomes[report.nodeid] = out
    elif report.when == "teardown" and report.outcome == "failed":
        _outcomes[report.nodeid] = "failed"


def pytest_sessionfinish(session, exitstatus):
    if not _OUT:
        return
    res = {"outcomes": _outcomes, **_counts}
    if _ON and _stats() is not None:
        res["lora"] = {**_stats().as_dict(), "kind_calls": dict(_kind_calls())}
    with open(_OUT, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
