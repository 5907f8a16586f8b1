"""What the multimodal tasks share: task options, the vision tower (pretrained CLIP tower or a
small one from a config), text + image examples, collate, and label handling.

Task options (`--task-options` JSON or k=v,k=v; `task_options:` in a config file), each task
lists the ones it reads in its `options`:

    vision_model   dir of a CLIP checkpoint (config.json + safetensors: pretrained tower) or
                   of a config.json alone (a fresh tower of that shape); default: SMALL_VISION
    vision_config  dict overriding SMALL_VISION fields (a fresh tower)
    image_size     pixels per side fed to the tower (default: the tower's image_size)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from ...models import TextEncoder, VisionEncoder, default_text_model
from ...models.vision_encoder import VisionConfig
from ..images import check_image, digits_records, load_pixels
from . import Batch, Task

__all__ = ["SMALL_VISION", "DIGITS_DEMO", "parse_options", "vision_tower", "MultimodalTask",
           "text_window", "fsdp_units"]

# A small ViT for 32 × 32 inputs: 8 × 8 patches of 4 px (+ CLS) = 65 tokens, 4 layers of 128.
SMALL_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_channels=3, image_size=32, patch_size=4,
                    hidden_act="gelu", layer_norm_eps=1e-5)

# The offline digits recipes (`mmcore train --task T` without data files): LoRA r=8 on the
# text tower's q/v, the small vision tower, projections and heads trained in full, batch 64.
DIGITS_DEMO = dict(mode="lora", target_modules=["q", "v"], lr=1e-3, head_lr=2e-3, epochs=10,
                   batch_size=64, warmup_ratio=0.05, window=0, eval_batch_size=128, keep_last=1,
                   log_every=5, synthetic_sizes=[1257, 180, 360])


def _value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_options(raw, defaults: dict, task: str) -> dict:
    """cfg.task_options (a dict, a JSON object string, or "k=v,k=v") merged over `defaults`;
    unknown keys are an error naming them and the known ones."""
    if raw is None or raw == "":
        given = {}
    elif isinstance(raw, dict):
        given = dict(raw)
    elif isinstance(raw, str):
        s = raw.strip()
        if s.startswith("{"):
            try:
                given = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"task_options: not a JSON object ({e})") from None
        else:
            given = {}
            for part in filter(None, (p.strip() for p in s.split(","))):
                k, eq, v = part.partition("=")
                if not eq:
                    raise ValueError(f"task_options: {part!r} is not key=value")
                given[k.strip()] = _value(v.strip())
    else:
        raise ValueError(f"task_options must be a dict or a string, got {type(raw).__name__}")
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise ValueError(f"task_options {bad} are not options of task {task!r}; it takes "
                         f"{sorted(defaults)}")
    for k, v in given.items():
        rule = OPTION_RULES.get(k)
        if rule is not None:
            given[k] = rule(v, f"task_options {k}")
    return {**defaults, **given}


def _option_rules() -> dict:
    """task option -> check(value, where) (the same checks as the config's fields)."""
    from ..config import _enum, _float, _int, _str

    def mapping(v, where):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{where}: must be a mapping of VisionConfig fields, got {v!r}")
        return v
    return {"image_size": _int(8, 4096, optional=True), "embed_dim": _int(1, 65536),
            "temperature": _float(0, lo_open=True), "vs_weight": _float(0),
            "n_fusion": _int(1, 64), "fusion_heads": _int(1, 1024),
            "matcher": _enum("dual", "fused"), "vision_model": _str(optional=True),
            "vision_config": mapping}


OPTION_RULES = _option_rules()


def vision_tower(opts: dict) -> VisionEncoder:
    """A pretrained CLIP vision tower (vision_model dir with safetensors), or a fresh tower
    from vision_model's config.json / SMALL_VISION + vision_config (CLIP-style init:
    N(0, 0.02) embeddings)."""
    path = opts.get("vision_model")
    if path:
        if not os.path.isdir(path):
            raise ValueError(f"task_options vision_model {path!r} is not a directory")
        if glob.glob(os.path.join(path, "*.safetensors")):
            tower = VisionEncoder.from_pretrained(path, dtype=torch.float32)
            want = opts.get("image_size")
            if want and want != tower.config.image_size:
                raise ValueError(f"task_options image_size {want}: the pretrained tower in "
                                 f"{path} takes {tower.config.image_size} px images")
            return tower
        try:
            with open(os.path.join(path, "config.json")) as f:
                cfg = VisionConfig.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            raise ValueError(f"task_options vision_model {path!r}: no usable config.json "
                             f"({e})") from None
        if opts.get("image_size"):
            cfg = dataclasses.replace(cfg, image_size=opts["image_size"])
    else:
        extra = opts.get("vision_config") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"task_options vision_config must be a dict, got {extra!r}")
        size = {"image_size": opts["image_size"]} if opts.get("image_size") else {}
        try:
            cfg = VisionConfig.from_dict({**SMALL_VISION, **size, **extra})
        except TypeError as e:
            raise ValueError(f"task_options vision_config: {e}") from None
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"task_options vision_config {name} must be an int >= 1, got {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"task_options vision_config hidden_size {cfg.hidden_size} must be a "
                         f"multiple of num_attention_heads {cfg.num_attention_heads}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"task_options image_size {cfg.image_size} must be a multiple of the "
                         f"tower's patch_size {cfg.patch_size}")
    tower = VisionEncoder(cfg)
    with torch.no_grad():
        tower.cls.normal_(0, 0.02)
        tower.pos.weight.normal_(0, 0.02)
    return tower


class MultimodalTask(Task):
    """Base of matching / retrieval / vqa / doc_figures.  Records: {"text", "label"?,
    "images": [path, ...] | "pixels": (3, R, R) or (M, 3, R, R)}; examples: {"ids", "label",
    "images": [{"pixels"} | {"image": path}], "image_key"}.

    options: the task_options this task reads (name -> default); labelled: whether every
    record needs a label (a class index is kept in "label", -1 when absent)."""

    options: Dict = {"vision_model": None, "vision_config": None, "image_size": None}
    labelled = True
    max_images = 1  # images per record (None: any number >= 1)
    data_kind = "captions"  # the offline digits set: captions or questions
    metric = "accuracy"  # eval_metric when the config keeps the classification default

    def __init__(self, cfg):
        super().__init__(cfg)
        from ...reading import load_tokenizer

        self.opts = parse_options(getattr(cfg, "task_options", None), self.options, self.name)
        self.model_dir = cfg.model or default_text_model()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.labels = [str(x) for x in cfg.labels] if cfg.labels else None
        if cfg.eval_metric == "accuracy" and self.metric != "accuracy":
            cfg.eval_metric = self.metric
        self._vision = None

    # ------------------------------------------------------------------ data
    def default_records(self) -> Dict[str, list]:
        """No data files: the digits (real scanned handwriting from scikit-learn), at most
        cfg.synthetic_sizes (train, validation, test) of the 1257 / 180 / 360 split."""
        return digits_records(self.data_kind, seed=self.cfg.seed, image_size=self.image_size,
                              sizes=self.cfg.synthetic_sizes)

    @property
    def vision(self) -> VisionEncoder:
        if self._vision is None:
            self._vision = vision_tower(self.opts)
        return self._vision

    @property
    def image_size(self) -> int:
        return int(self.opts["image_size"] or self.vision.config.image_size)

    def _label_names(self, records: Dict[str, list]) -> Optional[List[str]]:
        """Classes to predict come from the training split; relevance groups (labelled =
        False: matching, retrieval) from every split."""
        if self.labels is None:
            pool = records.get("train", []) if self.labelled else \
                [r for recs in records.values() for r in recs]
            names = sorted({str(r["label"]) for r in pool if r.get("label") is not None})
            if not names:
                if self.labelled:
                    raise ValueError(f"task {self.name!r} needs a label on every record")
                return None
            self.labels = names
            self.cfg.labels = list(names)
        return self.labels

    def examples(self, records: Dict[str, list]) -> Dict[str, list]:
        """records -> examples {"ids", "label" (class index or -1), "images", "image_key"
        (identity of the first image: its path or id)}."""
        from ..data import encode_texts

        names = self._label_names(records)
        index = {n: i for i, n in enumerate(names or [])}
        out = {}
        for split, recs in records.items():
            ids = encode_texts(self.tokenizer, [r["text"] for r in recs], self.cfg.max_tokens)
            ex = []
            for n, (r, x) in enumerate(zip(recs, ids)):
                e = {"ids": x, "label": -1}
                lab = r.get("label")
                where = r.get("where") or f"{split} record {n}"
                if lab is not None and names is not None:
                    if str(lab) not in index:
                        raise ValueError(f"{where}: label {lab!r} is not one of {names}")
                    e["label"] = index[str(lab)]
                elif self.labelled:
                    raise ValueError(f"{where}: no label (field {self.cfg.label_field!r}); "
                                     f"task {self.name!r} needs a label on every record")
                e["images"] = self._images(r, where)
                first = e["images"][0]
                e["image_key"] = os.path.abspath(first["image"]) if "image" in first else \
                    f"id:{r.get('image_id', f'{split}/{n}')}"
                ex.append(e)
            out[split] = ex
        return out

    def _images(self, r: dict, where: str) -> list:
        """A record's images -> [{"pixels": (3, R, R)} | {"image": path}], checked against
        max_images."""
        if r.get("pixels") is not None:
            p = r["pixels"]
            figs = [{"pixels": x} for x in (p if isinstance(p, (list, tuple)) or p.dim() == 4
                                            else [p])]
        else:
            imgs = r.get("images") or []
            if not isinstance(imgs, (list, tuple)) or not all(isinstance(p, str) for p in imgs):
                raise ValueError(f"{where}: 'images' must be a list of image paths, got "
                                 f"{imgs!r:.80}")
            figs = [{"image": path, "where": where} for path in imgs]
            for f in figs:
                if not os.path.isfile(f["image"]):
                    raise FileNotFoundError(f"{where}: image {f['image']!r} does not exist")
                check_image(f["image"], where)
        most = self.max_images
        if not figs or (most is not None and len(figs) > most):
            want = "exactly one image" if most == 1 else f"1..{most or 'any'} images"
            raise ValueError(f"{where}: task {self.name!r} needs {want} per record (field "
                             f"'images'), got {len(figs)}")
        return figs

    def length(self, example) -> int:
        return len(example["ids"])

    def collate_inputs(self, examples: list) -> dict:
        """-> {"input_ids" (B, S), "lengths" (B,), "pixels" (B, 3, R, R)}; with several
        images per record "pixels" (B, M, 3, R, R) zero-padded and "image_counts" (B,)."""
        from ..data import pad_batch

        ids, lengths = pad_batch([e["ids"] for e in examples], pad_id=0)
        out = {"input_ids": ids, "lengths": lengths}
        if self.max_images == 1:
            out["pixels"] = load_pixels([e["images"][0] for e in examples], self.image_size)
            return out
        counts = [len(e["images"]) for e in examples]
        R = self.image_size
        pix = torch.zeros(len(examples), max(counts), 3, R, R)
        for b, e in enumerate(examples):
            pix[b, :counts[b]] = load_pixels(e["images"], R)
        out.update(pixels=pix, image_counts=torch.tensor(counts, dtype=torch.long))
        return out

    def collate(self, examples: list) -> Batch:
        inputs = self.collate_inputs(examples)
        inputs["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return Batch(inputs, n_tokens=int(inputs["lengths"].sum()))

    def text_tower(self) -> TextEncoder:
        return TextEncoder.from_pretrained(self.model_dir, dtype=torch.float32, device="cpu",
                                           pooler=False)


def text_window(cfg):
    """The text tower's attention arguments: long-document mode (window (w, w) + global CLS)
    when cfg.window > 0, else full attention."""
    if cfg.window > 0:
        return {"window": (cfg.window, cfg.window), "global_tokens": 1}
    return {"window": None, "global_tokens": 0}


def fsdp_units(*modules: nn.Module) -> list:
    out = []
    for m in modules:
        out.extend(getattr(m, "layers", None) or getattr(m, "blocks", None) or [])
    return out
