"""`mmcore train`: fine-tune from a YAML/JSON config and/or flags, or run the embedded
long-document demo (no data files given).

    mmcore train                                     # the embedded default (offline, CPU)
    mmcore train --json                              # ... last line: one JSON object
    mmcore train --config run.yaml --lr 1e-4         # a config file, flags override it
    mmcore train --train-file tr.jsonl --val-file va.jsonl --test-file te.jsonl --mode lora
    mmcore train --resume runs/a                     # continue a run (its newest checkpoint)
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

_SKIP = ("betas",)  # set through a config file


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune (LoRA / BitFit / full / head) or run the long-document demo",
        description="Fine-tune a BERT-family model on JSONL/CSV data with mmcore's kernels, or, "
                    "with no data files, run the embedded demo: LoRA fine-tuning of MiniLM-L6 on "
                    "generated long documents, read whole vs cut at 512 tokens.")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields")
    p.add_argument("--resume", metavar="DIR", help="continue from a run dir or checkpoint dir")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object of results as the last line")
    from .train.config import TrainConfig

    notes = _field_notes(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        text = (notes.get(f.name, "") + f" (default {default})").strip()
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(kind),
                           type=_parser(f.name, kind), help=text)
    return p


def _field_notes(cls) -> dict:
    """The comment after each field of the dataclass's source: one place documents a knob."""
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).replace("%", "%%")
    return notes


def _kind(f):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace("Optional[", "").rstrip("]")
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list,
            "tuple": list}.get(t, str)


def _metavar(kind):
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
            src = {**{k: f"{ck}/trainer_state.json: config.{k}" for k in saved}, **src}
            cfg = TrainConfig.from_dict({**saved, **file_cfg, **flags}, src, origin)
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
