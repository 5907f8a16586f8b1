"""pytest plugin for transformers' own model tests (loaded with ``-p mmcore_hf_plugin`` by
``tests/peer/run_hf_models.py``; not collected by mmcore's own test run).

Environment:
  MMCORE_PEER_MODE   "base": transformers as is.  "mmcore": every model whose attention
                     implementation resolves to "sdpa" (transformers' default) is handed to
                     ``mmcore.patch(model)`` at the end of its construction (``post_init``), so
                     its attention runs on ``attn_implementation="mmcore"``; models built with
                     "eager" (the reference side of transformers' eager-vs-sdpa tests) stay eager.
                     The rule holds per sub-model: in a composite model whose sub-configs differ
                     (e.g. the text model "eager", the vision tower "sdpa"), only the sub-modules
                     holding the attention of an "sdpa" config are patched (``mmcore.patch`` on
                     each such sub-module); the eager ones and their configs stay eager.
  MMCORE_PEER_FORCE  "1": patch eager models too (Longformer: transformers reports no SDPA support
                     for it, so its models are always "eager"; mmcore maps its own attention).
                     "default": patch the eager models whose "eager" is transformers' own choice
                     (the family has no SDPA, and the model was built with no attention
                     implementation asked for: Gemma-2), and leave those built with "eager"
                     asked for (``attn_implementation="eager"``, ``config._attn_implementation =
                     "eager"``): the reference side of a comparison, or a test that wants the
                     attention weights (``config.output_attentions`` is only allowed on "eager"
                     by transformers).  A config copied from one that defaulted counts as asked
                     for (not known to be a default): such models stay eager.
  MMCORE_PEER_OUT    a JSON-lines file: one line per test report ({"test", "outcome"}, with the
                     cumulative attention counters of ``mmcore.patch.hf_interface.STATS`` in
                     mmcore mode; "patched_models": models patched so far; "eager_parts_left":
                     models finished with attention of an eager config left eager next to sdpa
                     parts), written as the run goes, so a run killed by its timeout still
                     leaves what it did.
  MMCORE_PEER_SHIMS  a JSON file {module: {name: value | null}}: names the test sources import
                     from transformers that the installed version lacks (tests of another
                     version); a value is set as is, null becomes a function that raises.

``datasets`` (imported at module level by transformers' pipeline test helpers, used by none of
the model tests) is replaced by an import stub when it is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types

_MODE = os.environ.get("MMCORE_PEER_MODE", "base")
_FORCE_MODE = os.environ.get("MMCORE_PEER_FORCE", "0")
_FORCE = _FORCE_MODE == "1"
_FORCE_DEFAULT = _FORCE_MODE == "default"
# configs whose "eager" transformers chose itself at a model's construction (none asked for):
# id(config) -> weakref (the identity is checked on lookup; ids of dead configs get reused)
_DEFAULT_EAGER: dict = {}
_OUT = os.environ.get("MMCORE_PEER_OUT")
_SHIMS = os.environ.get("MMCORE_PEER_SHIMS")
_patched = {"models": 0, "eager_parts_left": 0}


def _stub_module(name):
    mod = types.ModuleType(name)
    mod.__dict__["__mmcore_stub__"] = True

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*a, **k):
            raise ImportError(f"{name} is not installed (import stub of mmcore's peer-suite "
                              "runner)")
        return type(attr, (), {"__init__": unavailable}) if attr[:1].isupper() else unavailable
    mod.__getattr__ = __getattr__
    sys.modules[name] = mod


def _missing(name):
    def unavailable(*a, **k):
        raise NotImplementedError(f"{name} is not in the installed transformers (a stand-in of "
                                  "mmcore's peer-suite runner: the test sources are of another "
                                  "version)")
    unavailable.__name__ = name.rsplit(".", 1)[-1]
    return unavailable


def _apply_shims(path):
    with open(path) as f:
        shims = json.load(f)
    for modname, names in shims.items():
        mod = importlib.import_module(modname)
        for name, value in names.items():
            if not hasattr(mod, name):
                setattr(mod, name, _missing(f"{modname}.{name}") if value is None else value)


def _stats():
    from mmcore.patch import hf_interface
    return hf_interface.STATS


def _impl(config):
    return getattr(config, "_attn_implementation", None)


def _default_eager(config):
    ref = _DEFAULT_EAGER.get(id(config))
    return ref is not None and ref() is config and _impl(config) == "eager"


def _wants(config):
    """Is a config's attention implementation one the plugin hands to mmcore?  ("mmcore": a
    sub-model patched at its own ``post_init``, inside the model being finished now.)"""
    impl = _impl(config)
    return impl in ("sdpa", "mmcore") or (_FORCE and impl in ("eager", None)) or \
        (_FORCE_DEFAULT and _default_eager(config))


def _wants_mmcore(model):
    """Does any (sub-)config of the model resolve to sdpa (or, forced, eager)?"""
    impls, configs = set(), []
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    stack = [cfg]
    while stack:
        c = stack.pop()
        impls.add(_impl(c))
        configs.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return "sdpa" in impls or (_FORCE and impls <= {"eager", None}) or \
        (_FORCE_DEFAULT and any(_default_eager(c) for c in configs))


def _common_prefix(names):
    """The dotted module path that holds all of `names` ("" = the model itself)."""
    parts = [n.split(".") if n else [] for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def patch_targets(model):
    """-> the modules to hand to ``mmcore.patch``: [model] when the attention of every config
    in it is wanted (the whole model, as a user would patch it), else, per wanted config, the
    smallest sub-module holding all the attention modules of that config -- or, if that
    sub-module also holds attention of an unwanted (eager) config, each of its attention
    modules alone.  Configs already switched to "mmcore" (their sub-model was patched at its
    own ``post_init``) are left as they are."""
    from mmcore.patch import families
    groups: dict = {}
    for name, mod, kind in families._attention_modules(model):
        if kind in ("interface", "own") and getattr(mod, "config", None) is not None:
            groups.setdefault(id(mod.config), (mod.config, []))[1].append((name, mod))
    wanted = [g for g in groups.values() if _wants(g[0])]
    if len(wanted) == len(groups):
        return [model]
    unwanted = {name for c, members in groups.values() if not _wants(c)
                for name, _ in members}
    targets = []
    for config, members in wanted:
        if _impl(config) == "mmcore":
            continue
        prefix = _common_prefix([name for name, _ in members])
        inside = (lambda n, p=prefix: p == "" or n == p or n.startswith(p + "."))
        if any(inside(n) for n in unwanted):
            picks = [mod for _, mod in members]
        else:
            picks = [model.get_submodule(prefix) if prefix else model]
        for sub in picks:
            if getattr(sub, families._STATE_ATTR, None) is None and \
                    all(sub is not t for t in targets):
                targets.append(sub)
    return targets


def _track_default_eager():
    """Record the configs whose "eager" transformers chose at a model's construction (no
    implementation asked for), and forget a config once an implementation is set on it."""
    import weakref

    from transformers import PreTrainedConfig, PreTrainedModel

    real_check = PreTrainedModel._check_and_adjust_attn_implementation

    def check(self, attn_implementation, *a, **k):
        out = real_check(self, attn_implementation, *a, **k)
        init = k.get("is_init_check", a[0] if a else False)
        if init and attn_implementation is None and out == "eager":
            _DEFAULT_EAGER[id(self.config)] = weakref.ref(self.config)
        return out
    check.__wrapped__ = real_check
    PreTrainedModel._check_and_adjust_attn_implementation = check

    prop = PreTrainedConfig.__dict__["_attn_implementation"]

    def setter(self, value):
        stack = [self]
        while stack:  # the setter sets the sub-configs too
            c = stack.pop()
            _DEFAULT_EAGER.pop(id(c), None)
            for key in getattr(c, "sub_configs", {}) or {}:
                sub = getattr(c, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation"):
                    stack.append(sub)
        prop.fset(self, value)
    PreTrainedConfig._attn_implementation = property(prop.fget, setter, prop.fdel, prop.__doc__)


def _install_mmcore():
    import mmcore
    from transformers import PreTrainedModel

    if _FORCE_DEFAULT:
        _track_default_eager()

    real = PreTrainedModel.post_init

    def post_init(self, *a, **k):
        out = real(self, *a, **k)
        if _wants_mmcore(self):
            targets = patch_targets(self)
            for target in targets:
                mmcore.patch(target, lora=False)
            _patched["models"] += bool(targets)
            _patched["eager_parts_left"] += targets != [self]
        return out
    post_init.__wrapped__ = real
    PreTrainedModel.post_init = post_init


def pytest_configure(config):
    if importlib.util.find_spec("datasets") is None:
        _stub_module("datasets")
    if _SHIMS:
        _apply_shims(_SHIMS)
    if _MODE == "mmcore":
        _install_mmcore()
        _stats().reset()
    if _OUT:
        open(_OUT, "w").close()


def _write(rec):
    if _OUT:
        with open(_OUT, "a") as f:
            f.write(json.dumps(rec) + "\n")


def pytest_runtest_logreport(report):
    out = None
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        out = report.outcome
        if hasattr(report, "wasxfail"):
            out = "xfailed" if report.skipped else "xpassed"
    elif report.when == "teardown" and report.outcome == "failed":
        out = "failed"
    if out is None:
        return
    rec = {"test": report.nodeid, "outcome": out}
    if out == "failed" and report.longrepr is not None:
        rec["error"] = _error_line(report)
    if _MODE == "mmcore":
        rec["stats"] = _stats().as_dict()
        rec["patched_models"] = _patched["models"]
        rec["eager_parts_left"] = _patched["eager_parts_left"]
    _write(rec)


def _error_line(report):
    """The first 'E   ...' line of the failure (the exception), at most 300 characters."""
    text = str(report.longrepr)
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    return (lines[0] if lines else (text.strip().splitlines() or [""])[-1])[:300]
