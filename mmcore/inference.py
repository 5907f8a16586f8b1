"""Use a trained run: `mmcore.load_run(RUN)` rebuilds the model `mmcore train` trained (the
trainer's own task code: mmcore.train.tasks) from the run directory alone (run_dir.py) and
gives it the verb of its task.

    import mmcore
    clf = mmcore.load_run("runs/a")                    # a torch.nn.Module, in eval mode
    clf.predict(["a document of any length ..."])      # [{"label": "approved", "probs": {...}}]
    clf.logits(texts)                                  # (N, C) float32

    mmcore.load_run("runs/vqa").predict(["what digit is this?"], images=["7.png"])
    mmcore.load_run("runs/match").score(["a handwritten seven"], images=["7.png"])   # (N,)
    mmcore.load_run("runs/ret").rank(["a handwritten seven"], images=paths, top_k=5)

Documents are read whole in long-document mode with the run's window and global [CLS] (or cut
at the run's max_tokens), exactly as in training and testing.  The base model is found at the
path recorded in run.json (or `base=`), and refused when its weights' fingerprint differs from
the one the run was trained on.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["load_run", "RunModel", "Classifier", "Answerer", "Matcher", "Retriever"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _bar(n: int, desc: Optional[str], progress):
    """A tqdm bar over n documents on stderr (None without tqdm); progress None: only when
    stderr is a terminal."""
    from ._optional import optional

    tqdm = optional("tqdm")
    if tqdm is None:
        return None
    return tqdm.tqdm(total=n, unit="doc", desc=desc or "predict", leave=False,
                disable=None if progress is None else False, dynamic_ncols=True)


def _batches(order: Sequence[int], size: int):
    for i in range(0, len(order), size):
        yield list(order[i:i + size])


class RunModel(nn.Module):
    """A trained run's model.  `model` is the task's module (SequenceClassifier, DualEncoder,
    ...), `task` the trainer's Task (tokenizer, collate), `manifest` run.json, `labels` the
    classes / answers (None for matching and retrieval)."""

    verb = None

    def __init__(self, model: nn.Module, task, manifest: dict, run_dir: str):
        super().__init__()
        self.model, self.task, self.manifest, self.run_dir = model, task, manifest, run_dir
        self.labels = manifest.get("labels")
        self.max_tokens = manifest.get("max_tokens")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kw):
        return self.model(*args, **kw)

    def predict(self, *args, **kw):
        raise NotImplementedError(f"{self.run_dir}: task {self.manifest['task']!r} has no "
                                  f"predict(); call the model with its task's collate()")

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        """[CLS] text [SEP] ids per text, whole or cut at the run's max_tokens."""
        from .train.data import encode_texts

        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string")
        return encode_texts(self.task.tokenizer, list(texts), self.max_tokens)

    def _run(self, n: int, lengths: Sequence[int], batch_size: int, step: Callable,
             progress) -> None:
        """Call step(indices) over batches of similar lengths (longest first), with a tqdm bar
        on stderr when progress (None: when stderr is a terminal and there is more than one
        batch)."""
        order = sorted(range(n), key=lambda i: -lengths[i])
        bar = _bar(n, self.verb, progress) if progress is not False and n > batch_size \
            else None
        with torch.no_grad():
            for idx in _batches(order, batch_size):
                step(idx)
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()

    def _probs(self, logits: torch.Tensor) -> List[dict]:
        p = logits.float().softmax(-1)
        top = p.argmax(-1)
        return [{"label": self.labels[int(t)],
                 "probs": {lab: float(x) for lab, x in zip(self.labels, row)}}
                for t, row in zip(top, p)]


class Classifier(RunModel):
    """classification runs: predict(texts) -> [{"label", "probs": {label: p}}]."""

    verb = "classify"

    def logits(self, texts: Sequence[str], *, batch_size: int = 8, progress=False
               ) -> torch.Tensor:
        """(N, C) float32 logits, in the order of texts."""
        from .train.data import pad_batch

        ids = self.encode(texts)
        out = torch.empty(len(ids), len(self.labels))
        dev = self.device

        def step(idx):
            x, lens = pad_batch([ids[i] for i in idx], pad_id=0)
            out[idx] = self.model(x.to(dev), lens.to(dev))["logits"].float().cpu()
        self._run(len(ids), [len(x) for x in ids], batch_size, step, progress)
        return out

    def predict(self, texts: Sequence[str], *, batch_size: int = 8, progress=False
                ) -> List[dict]:
        return self._probs(self.logits(texts, batch_size=batch_size, progress=progress))


class _WithImages(RunModel):
    def _examples(self, texts, images) -> list:
        """Task examples ({"ids", "images"}) of texts and their images (per text: a path, a
        list of paths, or pixels: (3, R, R), (M, 3, R, R) or a list of (3, R, R))."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string")
        if images is None or len(images) != len(texts):
            raise ValueError(f"{self.manifest['task']} runs need one image entry per text, got "
                             f"{0 if images is None else len(images)} for {len(texts)} texts")
        ids = self.encode(texts)
        out = []
        for n, (x, im) in enumerate(zip(ids, images)):
            if isinstance(im, torch.Tensor) or (isinstance(im, (list, tuple)) and im and all(
                    isinstance(x, torch.Tensor) for x in im)):
                r = {"pixels": im}  # (3, R, R), (M, 3, R, R) or a list of (3, R, R)
            else:
                r = {"images": [im] if isinstance(im, (str, os.PathLike)) else list(im)}
            out.append({"ids": x, "images": self.task._images(r, f"input {n}")})
        return out

    def _inputs(self, ex) -> dict:
        dev = self.device
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v
                for k, v in self.task.collate_inputs(ex).items()}


class Answerer(_WithImages):
    """vqa / doc_figures runs: predict(texts, images) -> [{"label", "probs"}] (the answer /
    class of each question or document with its image(s))."""

    verb = "answer"

    def logits(self, texts, images, *, batch_size: int = 8, progress=False) -> torch.Tensor:
        ex = self._examples(texts, images)
        out = torch.empty(len(ex), len(self.labels))

        def step(idx):
            out[idx] = self.model(**self._inputs([ex[i] for i in idx]))["logits"].float().cpu()
        self._run(len(ex), [len(e["ids"]) for e in ex], batch_size, step, progress)
        return out

    def predict(self, texts, images, *, batch_size: int = 8, progress=False) -> List[dict]:
        return self._probs(self.logits(texts, images, batch_size=batch_size, progress=progress))


class Matcher(_WithImages):
    """matching runs: score(texts, images) -> (N,) float32: the cosine similarity of each
    caption and its image (dual encoder), or the match probability (fused matcher)."""

    verb = "score"

    def score(self, texts, images, *, batch_size: int = 8, progress=False) -> torch.Tensor:
        ex = self._examples(texts, images)
        out = torch.empty(len(ex))
        m = self.model

        def step(idx):
            inp = self._inputs([ex[i] for i in idx])
            ids, lens, pix = inp["input_ids"], inp["lengths"], inp["pixels"]
            if hasattr(m, "match_logits"):  # fused matcher
                h_t, h_v, _, _ = m.unimodal(ids, lens, pix)
                ar = torch.arange(len(idx), device=ids.device)
                out[idx] = m.match_logits(h_t, lens, h_v, ar, ar).float().sigmoid().cpu()
            else:
                t, v = m.encode_text(ids, lens), m.encode_image(pix)
                out[idx] = (t * v).sum(-1).float().cpu()
        self._run(len(ex), [len(e["ids"]) for e in ex], batch_size, step, progress)
        return out

    predict = score


class Retriever(RunModel):
    """retrieval runs: rank(queries, images, top_k) -> per query [{"image", "score"}] best
    first (cosine similarity of the projected embeddings)."""

    verb = "rank"

    def embed_texts(self, texts, *, batch_size: int = 8, progress=False) -> torch.Tensor:
        from .train.data import pad_batch

        ids = self.encode(texts)
        out = None
        dev = self.device

        def step(idx):
            nonlocal out
            x, lens = pad_batch([ids[i] for i in idx], pad_id=0)
            e = self.model.encode_text(x.to(dev), lens.to(dev)).float().cpu()
            out = torch.empty(len(ids), e.shape[1]) if out is None else out
            out[idx] = e
        self._run(len(ids), [len(x) for x in ids], batch_size, step, progress)
        return out

    def embed_images(self, images, *, batch_size: int = 32, progress=False) -> torch.Tensor:
        from .train.images import load_pixels

        figs = [self.task._images({"images": [p]}, f"gallery image {n}")[0]
                for n, p in enumerate(images)]
        out = None
        dev = self.device
        size = self.task.image_size

        def step(idx):
            nonlocal out
            pix = load_pixels([figs[i] for i in idx], size).to(dev, self._float())
            e = self.model.encode_image(pix).float().cpu()
            out = torch.empty(len(figs), e.shape[1]) if out is None else out
            out[idx] = e
        self._run(len(figs), [0] * len(figs), batch_size, step, progress)
        return out

    def _float(self):
        return next(self.model.parameters()).dtype

    def rank(self, queries, images, *, top_k: int = 5, batch_size: int = 8, progress=False
             ) -> List[List[dict]]:
        from .train.retrieval_index import topk_search

        if not images:
            raise ValueError("rank needs a gallery of at least one image")
        q = self.embed_texts(queries, batch_size=batch_size, progress=progress)
        g = self.embed_images(images, progress=progress)
        k = min(int(top_k), len(images))
        scores, top = topk_search(q, g, k)
        return [[{"image": os.fspath(images[int(j)]), "score": float(s)}
                 for s, j in zip(srow, trow)] for srow, trow in zip(scores, top)]

    predict = rank


_CLASSES = {"classification": Classifier, "vqa": Answerer, "doc_figures": Answerer,
            "matching": Matcher, "retrieval": Retriever}


def load_run(path: str, *, base: Optional[str] = None, device: Union[str, torch.device] = "cpu",
             dtype=None, task: Optional[str] = None) -> RunModel:
    """The trained model of run directory `path` (what `mmcore train` wrote), in eval mode.

    base: the base model dir, when it is no longer at the path run.json records (its weights
    must be the ones the run was trained on: same sha256 fingerprint).  dtype: None (float32),
    torch.bfloat16 / "bf16", ...  task: refuse a run of another task (ValueError).
    Returns a Classifier / Answerer / Matcher / Retriever (a RunModel: torch.nn.Module)."""
    from .models import default_text_model
    from .reading import load_tokenizer
    from .train.config import TrainConfig
    from .train.modes import apply_mode
    from .train.run_dir import fingerprint, load_run_weights, read_manifest
    from .train.tasks import get_task

    path = os.fspath(path)
    m = read_manifest(path)
    if task is not None and m["task"] != task:
        raise ValueError(f"{path!r} is a {m['task']} run, not a {task} run")
    b = m["base"]
    where = os.fspath(base) if base is not None else b["path"]
    if base is None and not os.path.isdir(where) and b.get("model") is None:
        where = default_text_model()  # the shipped MiniLM, installed elsewhere now
    if not os.path.isdir(where):
        raise FileNotFoundError(f"{path}: its base model {where!r} is not there (trained on "
                                f"{b.get('name') or b['path']}); pass base= / --base with the "
                                f"dir of that model")
    fp = fingerprint(where)
    if fp != b["fingerprint"]:
        raise ValueError(f"{path}: base model {where!r} is not the one the run was trained on "
                         f"(weights {fp[:19]}..., the run's base {b['fingerprint'][:19]}... at "
                         f"{b['path']}); pass base= / --base with the right model dir")
    import dataclasses

    known = {f.name for f in dataclasses.fields(TrainConfig)}  # a run from another version
    d = {k: v for k, v in m["config"].items() if k in known}
    d.update(model=where, out_dir=path, progress=False)
    files = m["files"]
    if files.get("vision"):  # the tower's shape from the run; its weights from the head
        from .train.tasks.multimodal import parse_options

        opts = parse_options(d.get("task_options"), getattr(get_task(d["task"]), "options", {}),
                             d["task"])
        opts.update(vision_model=os.path.join(path, files["vision"]), vision_config=None)
        d["task_options"] = opts
    cfg = TrainConfig.from_dict(d)
    t = get_task(cfg.task)(cfg)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        t.tokenizer = load_tokenizer(path)
    with torch.random.fork_rng(devices=[]):  # fresh layers' init must not move the user's RNG
        model = t.build_model()
        apply_mode(model, cfg.mode, target_modules=cfg.target_modules, r=cfg.lora_r,
                   lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   bias=cfg.lora_bias, backend=cfg.backend)
    load_run_weights(path, m, model)
    model.requires_grad_(False)
    out = _CLASSES.get(m["task"], RunModel)(model, t, m, path)
    return out.to(device=device, dtype=_dtype(dtype)).eval()
