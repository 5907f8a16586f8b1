"""The training loop: one visible loop over optimizer steps —

    for each step: micro-batches -> forward (autocast) -> loss -> backward (GradScaler for
    fp16; FGM's adversarial pass when asked) -> unscale, clip, AdamW step, schedule ->
    log -> evaluate every N steps -> early stopping -> checkpoint

over any model whose forward returns {"loss": 0-dim tensor, ...} (a task supplies the model,
the collate function and the metrics).  Runs as one process, under torchrun as DDP, or
sharded with FSDP2; the wrapping happens in one place (distributed.wrap).

Exactness: the data order is a function of (seed, epoch) only, each step's examples are split
over micro-batches and ranks, and each rank's loss is weighted by its share of the step's
examples, so N processes with batch b compute the same update as one process with batch N·b.
Checkpoints hold everything the next step reads (weights, AdamW moments, schedule, grad
scaler, RNG states, the position in the epoch's batch order), so a resumed run continues
bitwise on the CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .checkpoint import (check_checkpoint_files, find_checkpoint, load_checkpoint,
                         save_checkpoint)
from .config import TrainConfig
from .data import LengthBucketSampler, shard, split_micro
from .losses import FGM
from .optim import build_optimizer, build_scheduler
from .tasks import Batch, Task

__all__ = ["Trainer", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to(inputs: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


class Trainer:
    """Train `model` (trainable parameters already chosen, see modes.apply_mode) on `train`
    examples of `task`, evaluating on `val`.

    Args:
        model: nn.Module, forward(**batch.inputs) -> {"loss": 0-dim tensor, ...}.
        task: supplies length() / collate() / outputs() / metrics().
        cfg: TrainConfig (batch_size is per process and micro-batch).
        train, val: lists of examples (task.prepare's output).
        dist: a distributed.Dist (default: set up from the torchrun environment).
        resume: a checkpoint dir / run dir to continue from.
        adapter_config: peft adapter_config.json contents (LoRA mode).
        log: callable(str) for messages (rank 0 only).
    """

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, train: list,
                 val: Optional[list] = None, *, dist: Optional[D.Dist] = None,
                 resume: Optional[str] = None, adapter_config: Optional[dict] = None,
                 log: Optional[Callable[[str], None]] = None):
        self.cfg, self.task, self.train_set, self.val_set = cfg, task, train, val
        self.d = dist or D.setup(cfg.device, cfg.fsdp)
        self.device = self.d.device
        self.log = (log or print) if self.d.main else (lambda s: None)
        self.adapter_config = adapter_config
        self.out_dir = cfg.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.resume_path = find_checkpoint(resume) if resume else None
        # every file the resume reads is checked before anything is written
        rs = check_checkpoint_files(self.resume_path) if self.resume_path else None
        if self.d.main:
            os.makedirs(self.ckpt_root, exist_ok=True)
        if not train:
            raise ValueError("the training set is empty")
        self.raw = model.to(self.device)
        self.model = D.wrap(self.raw, self.d, fsdp=cfg.fsdp)
        self.opt = build_optimizer(self.raw, cfg, self.device)
        self.step_batch = rs["global_batch"] if rs else cfg.batch_size * self.d.world * \
            cfg.grad_accum
        if self.step_batch < self.d.world:
            raise ValueError(f"a step's {self.step_batch} examples cannot feed {self.d.world} "
                             f"processes")
        self.sampler = LengthBucketSampler([task.length(e) for e in train], self.step_batch,
                                           seed=cfg.seed, bucket=cfg.bucket,
                                           drop_last=len(train) >= self.step_batch)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.sched = build_scheduler(self.opt, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        self.fgm = None
        if cfg.fgm_epsilon > 0:
            if cfg.fsdp:
                raise ValueError("fgm_epsilon > 0 is not supported with --fsdp (the embedding "
                                 "matrix is sharded); use DDP")
            emb = self.raw.get_input_embeddings() if hasattr(
                self.raw, "get_input_embeddings") else None
            if emb is None:
                raise ValueError("fgm_epsilon > 0 needs model.get_input_embeddings()")
            self.fgm = FGM(emb, cfg.fgm_epsilon)
        self.state = dict(step=0, epoch=0, batch_in_epoch=0, global_batch=self.step_batch,
                          best=None, best_step=None, bad_evals=0, stopped=None, tokens=0,
                          last_eval=None)
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        if self.resume_path:
            self._resume()
        else:
            seed_everything(cfg.seed + 1000 * self.d.rank)  # dropout differs per rank
            if self.d.main and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)

    # ------------------------------------------------------------------ resume

    def _resume(self):
        ts = load_checkpoint(self.resume_path, model=self.model, optimizer=self.opt,
                             scheduler=self.sched, scaler=self.scaler, d=self.d)
        for k in self.state:
            if k in ts:
                self.state[k] = ts[k]
        if ts["world_size"] != self.d.world:
            seed_everything(self.cfg.seed + 7919 * self.state["step"] + 1000 * self.d.rank)
            self.log(f"resumed a {ts['world_size']}-process checkpoint on {self.d.world}: "
                     f"the data order and global batch ({self.step_batch}) carry over; RNG "
                     f"streams are re-seeded")
        if self.d.main and os.path.exists(self.metrics_path):  # drop lines past the checkpoint
            keep = []
            with open(self.metrics_path, encoding="utf-8", errors="replace") as f:
                for ln in f:
                    try:
                        row = json.loads(ln) if ln.strip() else None
                    except json.JSONDecodeError:
                        row = None
                    if isinstance(row, dict) and isinstance(row.get("step", 0), int) and \
                            row.get("step", 0) <= self.state["step"]:
                        keep.append(ln)
            with open(self.metrics_path, "w") as f:
                f.writelines(keep)
        self.log(f"resumed from {self.resume_path} at step {self.state['step']} "
                 f"(epoch {self.state['epoch']}, batch {self.state['batch_in_epoch']})")

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _no_sync(self, last: bool):
        if not last and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, step_indices: list) -> dict:
        """One optimizer step over `step_indices` (all ranks' examples).  -> {"loss" (mean
        over the step's examples), "tokens", "grad_norm"}."""
        self.model.train()
        n_step = len(step_indices)
        micro = split_micro(step_indices, self.cfg.grad_accum)
        passes = 2 if self.fgm is not None else 1
        loss_sum, tokens = 0.0, 0
        for i, mb in enumerate(micro):
            mine = shard(mb, self.d.rank, self.d.world)
            if not mine:
                raise RuntimeError(f"rank {self.d.rank} got no examples from a micro-batch of "
                                   f"{len(mb)}; raise batch_size or lower grad_accum")
            batch: Batch = self.task.collate([self.train_set[j] for j in mine])
            inputs = _to(batch.inputs, self.device)
            weight = len(mine) * self.d.world / n_step  # DDP / FSDP average over ranks
            for p in range(passes):
                last = i == len(micro) - 1 and p == passes - 1
                with self._no_sync(last):
                    if p == 0 and self.fgm is not None:
                        self.fgm.begin()
                    if p == 1:
                        self.fgm.attack()
                    with self._autocast():
                        loss = self.model(**inputs)["loss"]
                    if not torch.isfinite(loss.detach()) and self.scaler is None:
                        raise FloatingPointError(self._diverged(f"loss is {float(loss)}"))
                    self._backward(loss.float() * weight)
                    if p == 1:
                        self.fgm.restore()
                if p == 0:
                    loss_sum += float(loss.detach()) * len(mine)
            tokens += batch.n_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = None
        if self.cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._check_finite_weights()
        loss_sum, tokens = D.all_reduce_sum([loss_sum, float(tokens)], self.d)
        return {"loss": loss_sum / n_step, "tokens": int(tokens), "grad_norm": gnorm}

    def _diverged(self, what: str) -> str:
        """The one-line message of a non-finite loss / weight: the step and the likely cause."""
        c = self.cfg
        lrs = f"lr {c.lr:g}" + (f", head_lr {c.head_lr:g}" if c.head_lr is not None else "")
        return (f"{what} at step {self.state['step'] + 1}: training diverged; likely cause: "
                f"a learning rate too high ({lrs}), or class_weights / lora_alpha / "
                f"fgm_epsilon / precision {c.precision} overflowing; nothing from this step "
                f"was saved (lower the learning rate, or set max_grad_norm)")

    def _check_finite_weights(self) -> None:
        """After an optimizer step: every trainable tensor finite (one reduction, one sync),
        so a non-finite model is never evaluated, saved or kept as best."""
        if not self.params:
            return
        norms = torch._foreach_norm([p.detach() for p in self.params])
        bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
        if bool(bad.any()):
            names = [n for n, p in self.raw.named_parameters() if p.requires_grad]
            first = names[int(bad.nonzero()[0])] if len(names) == len(norms) else "?"
            raise FloatingPointError(self._diverged(f"non-finite weights ({first})"))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, data: list, batch_size: Optional[int] = None) -> dict:
        """Run the model over `data` (split over the ranks, each rank the same number of
        batches — FSDP needs every rank in every forward), gather task.outputs() in data
        order.  -> {name: tensor (len(data), ...)}."""
        self.model.eval()
        B = batch_size or self.cfg.eval_batch_size or self.cfg.batch_size
        order = sorted(range(len(data)), key=lambda j: self.task.length(data[j]))
        per = -(-len(order) // self.d.world)
        mine = order[self.d.rank * per:(self.d.rank + 1) * per]
        n_batches = -(-per // B)
        outs, idx = [], []
        for k in range(n_batches):
            chunk = mine[k * B:(k + 1) * B]
            real = len(chunk)
            if not chunk:  # keep the ranks in step: a dummy batch whose outputs are dropped
                chunk = order[:1]
            batch = self.task.collate([data[j] for j in chunk])
            with self._autocast():
                out = self.model(**_to(batch.inputs, self.device))
            o = self.task.outputs(out, batch)
            outs.append({k2: v[:real] for k2, v in o.items()})
            idx.extend(chunk[:real])
        parts = D.gather_objects((idx, outs), self.d)
        all_idx = [j for ix, _ in parts for j in ix]
        batches = [o for _, os_ in parts for o in os_]
        if not batches:
            return {}
        merged = {k: torch.cat([o[k] for o in batches]) for k in batches[0]}
        inv = torch.empty(len(all_idx), dtype=torch.long)
        inv[torch.tensor(all_idx, dtype=torch.long)] = torch.arange(len(all_idx))
        return {k: v[inv] for k, v in merged.items()}

    def evaluate(self, data: list, split: str = "validation") -> dict:
        """task.metrics over `data`; logged to metrics.jsonl."""
        m = self.task.metrics(self.predict(data))
        self._log_row({"step": self.state["step"], "split": split, **m})
        return m

    # ------------------------------------------------------------------ logging

    def _log_row(self, row: dict) -> None:
        if self.d.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _bar(self):
        if not (self.cfg.progress and self.d.main):
            return None
        from .._optional import optional

        tqdm = optional("tqdm")
        if tqdm is None:
            return None
        return tqdm.tqdm(total=self.total_steps, initial=self.state["step"], unit="step",
                    dynamic_ncols=True, leave=False, desc="train")

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: Optional[str] = None) -> str:
        st = self.state
        return save_checkpoint(
            self.ckpt_root, name or f"step-{st['step']:06d}", model=self.model,
            optimizer=self.opt, scheduler=self.sched, scaler=self.scaler, state=dict(st),
            config=self.cfg.to_dict(), d=self.d, mode=self.cfg.mode,
            adapter_config=self.adapter_config, keep_last=self.cfg.keep_last,
            is_best=st["best_step"] == st["step"] and st["best"] is not None,
            best_metric=st["best"])

    def load_weights(self, path: str) -> None:
        """Only the model's trainable tensors of a checkpoint (e.g. the best one)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)

        from .checkpoint import _check_shapes, _load_tensors, model_key

        if self.cfg.mode == "lora":
            wpath = os.path.join(path, "adapter", "adapter_model.safetensors")
            sd = {model_key(k): v for k, v in _load_tensors(wpath).items()}
        else:
            wpath = os.path.join(path, "model.safetensors")
            sd = _load_tensors(wpath)
        _check_shapes(wpath, sd, self.model)
        set_model_state_dict(self.model, sd,
                             options=StateDictOptions(full_state_dict=True, strict=False))

    # ------------------------------------------------------------------ the loop

    def _improved(self, v: float) -> bool:
        if not math.isfinite(v):  # a NaN / inf metric never makes a checkpoint the best
            return False
        b = self.state["best"]
        return b is None or (v > b if self.cfg.eval_mode == "max" else v < b)

    def _after_eval(self, m: dict) -> None:
        st, key = self.state, self.cfg.eval_metric
        if key not in m:
            raise ValueError(f"eval_metric {key!r} is not among the task's metrics {sorted(m)}")
        st["last_eval"] = m
        if self._improved(float(m[key])):
            st["best"], st["best_step"], st["bad_evals"] = float(m[key]), st["step"], 0
        else:
            st["bad_evals"] += 1
            if self.cfg.patience is not None and st["bad_evals"] >= self.cfg.patience:
                st["stopped"] = f"early stopping: {key} did not improve for " \
                                f"{st['bad_evals']} evaluations"

    def fit(self) -> dict:
        """Train to total_steps (or early stopping).  -> the final state dict."""
        cfg, st = self.cfg, self.state
        bar = self._bar()
        t0, tok0 = time.perf_counter(), 0
        last_saved = st["step"] if self.resume_path else None
        cached = (None, None)
        while st["step"] < self.total_steps and not st["stopped"]:
            if cached[0] != st["epoch"]:
                cached = (st["epoch"], self.sampler.batches(st["epoch"]))
            batches = cached[1]
            if st["batch_in_epoch"] >= len(batches):
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
                continue
            r = self.train_step(batches[st["batch_in_epoch"]])
            st["batch_in_epoch"] += 1
            st["step"] += 1
            st["tokens"] += r["tokens"]
            tok0 += r["tokens"]
            end_of_epoch = st["batch_in_epoch"] >= len(batches)
            dt = time.perf_counter() - t0
            lr = self.sched.get_last_lr()[0]
            tps = tok0 / max(dt, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                refresh=False)
            if st["step"] % cfg.log_every == 0 or st["step"] == 1:
                self._log_row({"step": st["step"], "epoch": st["epoch"], "split": "train",
                               "loss": r["loss"], "lr": lr, "grad_norm": r["grad_norm"],
                               "tokens_per_s": tps, "elapsed_s": dt})
            do_eval = self.val_set and (
                (cfg.eval_every and st["step"] % cfg.eval_every == 0)
                or (not cfg.eval_every and end_of_epoch) or st["step"] == self.total_steps)
            if do_eval:
                m = self.evaluate(self.val_set)
                self._after_eval(m)
                if bar is not None:
                    bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{lr:.2e}",
                                    **{cfg.eval_metric: f"{m[cfg.eval_metric]:.4f}"})
            do_save = (cfg.save_every and st["step"] % cfg.save_every == 0) or \
                (not cfg.save_every and do_eval) or (do_eval and st["best_step"] == st["step"])
            if end_of_epoch:
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
            if do_save:
                self.save()
                last_saved = st["step"]
        if bar is not None:
            bar.close()
        if last_saved != st["step"]:
            self.save()
        return dict(st)

    def close(self) -> None:
        D.teardown(self.d)

