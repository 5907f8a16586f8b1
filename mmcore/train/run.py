"""One training run from a TrainConfig: task -> data -> model -> mode -> Trainer -> test
report.  What `mmcore train` calls; usable from Python:

    from mmcore.train import TrainConfig, train
    res = train(TrainConfig(train_file="train.jsonl", val_file="val.jsonl",
                            test_file="test.jsonl", mode="lora", out_dir="runs/a"))
    res["test"]["accuracy"], res["report"]         # classification report + confusion matrix

Files written to out_dir: metrics.jsonl, curves.png, report.json (+ report.txt), results.json,
checkpoints/ (see checkpoint.py), and the trained model: run.json, adapter/ or
encoder.safetensors, head.safetensors, tokenizer files (see run_dir.py; `mmcore.load_run`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Optional

import torch

from . import distributed as D
from .config import TrainConfig
from .data import read_records
from .modes import apply_mode, head_modules, trainable_report
from .plots import save_curves
from .tasks import get_task
from .trainer import Trainer, seed_everything

__all__ = ["train", "load_records"]


def load_records(cfg: TrainConfig) -> dict:
    """{split: records} from cfg's files, or the generated long-document set
    (cfg.synthetic_sizes) when no train_file is given."""
    if cfg.train_file is None:
        from .synthetic import long_document_splits

        n_train, n_val, n_test = cfg.synthetic_sizes
        return long_document_splits(n_train, n_val, n_test, seed=cfg.seed,
                                    tokens=tuple(cfg.synthetic_tokens), model_dir=cfg.model)
    out = {}
    for split, path in (("train", cfg.train_file), ("validation", cfg.val_file),
                        ("test", cfg.test_file)):
        if path:
            out[split] = read_records(path, text_field=cfg.text_field,
                                      label_field=cfg.label_field, image_field=cfg.image_field)
    return out


def _adapter_config(model, cfg: TrainConfig) -> dict:
    """peft's adapter_config.json for this model's LoRA layers (mmcore.nn.save_adapter's),
    with peft's `bias` mode and the head as modules_to_save."""
    from ..nn import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        ac = save_adapter(model, tmp, base_model_name_or_path=cfg.model,
                          modules_to_save=head_modules(model) or None)
    ac["bias"] = cfg.lora_bias
    return ac


def train(cfg: TrainConfig, records: Optional[dict] = None, *, resume: Optional[str] = None,
          log: Optional[Callable[[str], None]] = None, dist: Optional[D.Dist] = None) -> dict:
    """Run training (and the test evaluation when a test split exists).

    Returns {"model" (the trained nn.Module, unwrapped), "state", "validation", "test",
    "report", "report_text", "seconds", "trainable", "out_dir", "best_checkpoint"}; the same
    but the model is written to results.json."""
    d = dist or D.setup(cfg.device, cfg.fsdp)
    say = (log or print) if d.main else (lambda s: None)
    t0 = time.perf_counter()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)  # the same model init on every rank
        task = get_task(cfg.task)(cfg)
        if records is None and cfg.train_file is None and hasattr(task, "default_records"):
            records = task.default_records()  # the task's own offline data set
        data = task.prepare(records if records is not None else load_records(cfg))
        if "train" not in data:
            raise ValueError("no training data: give train_file (or no files at all for the "
                             "generated long-document set)")
        model = task.build_model()
        apply_mode(model, cfg.mode, target_modules=cfg.target_modules, r=cfg.lora_r,
                   lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   bias=cfg.lora_bias, backend=cfg.backend)
        trainable = trainable_report(model, as_dict=True)
        say(trainable_report(model))
        ac = _adapter_config(model, cfg) if cfg.mode == "lora" else None
        saving = _run_dir_parts(model, cfg)
        if d.main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        trainer = Trainer(model, task, cfg, data["train"], data.get("validation"), dist=d,
                          resume=resume, adapter_config=ac, log=say)
        say(f"{len(data['train'])} training examples, {trainer.steps_per_epoch} steps/epoch "
            f"of {trainer.step_batch} examples ({d.world} process(es) x batch "
            f"{cfg.batch_size} x accum {cfg.grad_accum}), {trainer.total_steps} steps")
        state = trainer.fit()
        if state["stopped"]:
            say(state["stopped"])
        best = _best_path(trainer)
        if cfg.load_best and best and state["best_step"] != state["step"]:
            trainer.load_weights(best)
            say(f"loaded the best checkpoint ({os.path.basename(best)}, "
                f"{cfg.eval_metric} {state['best']:.4f}) for the test")
        res = {"model": trainer.raw, "state": state, "validation": state.get("last_eval"),
               "test": None,
               "report": None, "report_text": "", "trainable": trainable, "out_dir": cfg.out_dir,
               "best_checkpoint": best}
        if data.get("test"):
            g = trainer.predict(data["test"])
            res["test"] = task.metrics(g)
            res["report"] = task.report(g)
            res["report_text"] = task.format_report(res["report"]) if res["report"] else ""
            trainer._log_row({"step": state["step"], "split": "test", **res["test"]})
        state_sd = _trained_state(trainer)  # collective: every rank takes part
        res["seconds"] = time.perf_counter() - t0
        if d.main:
            _write_outputs(cfg, res)
            from .run_dir import save_run

            save_run(cfg.out_dir, cfg, task, state_sd, test=res["test"], **saving)
        return res
    finally:
        if dist is None:
            D.teardown(d)


def _run_dir_parts(model, cfg) -> dict:
    """What save_run needs from the plain (unwrapped) model: the text encoder's prefix, its
    peft adapter config in Hugging Face names (LoRA), the vision tower's config."""
    from .run_dir import base_path, hf_adapter_config, text_encoder_prefix, vision_config_of

    prefix = text_encoder_prefix(model)
    ac = None
    if cfg.mode == "lora" and prefix is not None:
        enc = model.get_submodule(prefix[:-1]) if prefix else model
        from ..nn import lora_modules

        if lora_modules(enc):
            ac = hf_adapter_config(enc, cfg, base_path(cfg.model))
    return {"prefix": prefix, "adapter_config": ac, "vision_config": vision_config_of(model)}


def _trained_state(trainer) -> dict:
    """The trainable tensors (full, on the CPU) of the trained model, by the task model's
    names — what the test was evaluated with."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from .checkpoint import _full_options

    return get_model_state_dict(trainer.model, options=_full_options(ignore_frozen_params=True))


def _best_path(trainer) -> Optional[str]:
    from .checkpoint import read_index

    idx = D.broadcast_object(read_index(trainer.ckpt_root) if trainer.d.main else None,
                             trainer.d)
    return os.path.join(trainer.ckpt_root, idx["best"]) if idx.get("best") else None


def _write_outputs(cfg, res) -> None:
    out = cfg.out_dir
    if res["report"] is not None:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(res["report"], f, indent=1)
        if res.get("report_text"):
            with open(os.path.join(out, "report.txt"), "w") as f:
                f.write(res["report_text"] + "\n")
    save_curves(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"),
                metric=cfg.eval_metric, title=os.path.basename(os.path.abspath(out)))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: v for k, v in res.items() if k != "model"}, f, indent=1, default=str)
