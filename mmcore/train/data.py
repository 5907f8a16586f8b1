"""Data: JSONL / CSV records, tokenised whole (long-document mode) or cut at `max_tokens`,
dynamic padding, and a length-bucketed, seeded, distributed-aware batch sampler.

    records = read_records("train.jsonl")                  # [{"text": ..., "label": ...}, ...]
    sampler = LengthBucketSampler(lengths, step_batch=8, seed=0)
    for step_indices in sampler.batches(epoch):            # one optimizer step's examples
        for micro in split_micro(step_indices, accum=2):   # grad-accumulation micro-batches
            mine = shard(micro, rank, world)               # this process's share

A batch is never padded to the longest document of the data set: each step's examples are
drawn from a bucket of similar lengths, and a micro-batch pads only to its own longest.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["read_records", "encode_texts", "pad_batch", "LengthBucketSampler", "split_micro",
           "shard"]


def jsonl_objects(lines: Iterable[str], where: str) -> List[tuple]:
    """[(line number, dict)] of the non-blank JSONL `lines`; ValueError naming `where:line`
    for a line that is not a JSON object."""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{where}:{i}: each line must be a JSON object, got "
                             f"{type(r).__name__}")
        rows.append((i, r))
    return rows


def read_records(path: str, *, text_field: str = "text", label_field: Optional[str] = "label",
                 image_field: Optional[str] = "images") -> List[dict]:
    """JSON-lines (.jsonl / .json, one object a line) or CSV (.csv / .tsv, header row) ->
    [{"text": str, "label": value or None, "images": [paths], "where": "FILE line N"}, ...]
    plus any other fields.  A UTF-8 byte-order mark is accepted.

    image_field: a list of paths, or one path, or a ';'-separated string (CSV); relative
    paths are resolved against the file's directory.

    Labels must be strings, ints or finite numbers (a list, a dict, NaN or inf is refused);
    labels are compared as strings, so a file mixing the int 1 and the string "1" is refused
    rather than merging them silently.  Every error names the file and the line."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"data file must be a path, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    rows = []  # (line number, record)
    try:
        if path.endswith((".csv", ".tsv")):
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",",
                                        strict=True)
                try:
                    for r in reader:
                        if None in r:  # more cells than header columns
                            raise ValueError(f"{path} line {reader.line_num}: more cells than the "
                                             f"header's {len(reader.fieldnames)} columns")
                        rows.append((reader.line_num, r))
                except csv.Error as e:
                    raise ValueError(f"{path} line {reader.line_num}: not valid CSV ({e})") \
                        from None
        else:
            with open(path, encoding="utf-8-sig") as f:
                rows.extend(jsonl_objects(f, path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    out, seen = [], {}  # seen: str(label) -> (type name, where) of its first record
    for i, r in rows:
        where = f"{path} line {i}"
        if text_field not in r or not isinstance(r[text_field], str):
            raise ValueError(f"{where}: no string field {text_field!r} (set text_field)")
        rec = dict(r)
        rec["text"] = r[text_field]
        rec["where"] = where
        lab = r.get(label_field) if label_field else None
        if isinstance(lab, str) and path.endswith((".csv", ".tsv")) and lab == "":
            lab = None  # an empty CSV cell: no label
        _check_label(lab, f"{where}: field {label_field!r}")
        if lab is not None:
            key, kind = str(lab), type(lab).__name__
            first = seen.setdefault(key, (kind, where))
            if first[0] != kind:
                raise ValueError(f"{where}: label {lab!r} ({kind}) and the {first[0]} label at "
                                 f"{first[1]} are the same class name {key!r}; use one type")
        rec["label"] = lab
        imgs = r.get(image_field) if image_field else None
        if isinstance(imgs, str):
            imgs = [p for p in imgs.split(";") if p]
        if imgs is None:
            imgs = []
        if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
            raise ValueError(f"{where}: field {image_field!r} must be an image path or a list "
                             f"of paths, got {imgs!r:.80}")
        rec["images"] = [p if os.path.isabs(p) else os.path.join(base, p) for p in imgs]
        out.append(rec)
    if not out:
        raise ValueError(f"data file {path!r} holds no records")
    return out


def _check_label(lab, where: str) -> None:
    """A label is None (absent), a non-empty string, an int or a finite number."""
    if lab is None or isinstance(lab, str) and lab.strip():
        return
    if isinstance(lab, bool) or isinstance(lab, int):
        return
    if isinstance(lab, float) and math.isfinite(lab):
        return
    raise ValueError(f"{where}: a label must be a non-empty string or a number, got "
                     f"{lab!r:.80}")


def encode_texts(tokenizer, texts: Sequence[str], max_tokens: Optional[int] = None) -> list:
    """[CLS] text [SEP] ids per text (lists of int), whole, or cut to `max_tokens` (the last
    kept token is [SEP], as a BERT user's truncation=True, max_length=N gives)."""
    enc = tokenizer.tok.encode_batch(list(texts), add_special_tokens=False)
    out = []
    for e in enc:
        ids = [tokenizer.cls] + e.ids + [tokenizer.sep]
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[:max_tokens - 1] + [tokenizer.sep]
        out.append(ids)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0):
    """Dynamic padding: -> input_ids (B, S_max) int64 right-padded, lengths (B,) int64."""
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


class LengthBucketSampler:
    """Seeded batches of similar lengths, the same on every process.

    Each epoch: shuffle all indices (seed + epoch), cut them into buckets of
    `step_batch * bucket_batches` examples, sort each bucket by length, cut it into step
    batches of `step_batch`, and shuffle the order of the step batches.  `step_batch` is the
    number of examples of one optimizer step over all processes and micro-batches.
    bucket=False: plain shuffled batches.  shuffle=False: the data order, unbucketed
    (evaluation)."""

    def __init__(self, lengths: Sequence[int], step_batch: int, *, seed: int = 0,
                 shuffle: bool = True, bucket: bool = True, bucket_batches: int = 16,
                 drop_last: bool = False):
        if step_batch < 1:
            raise ValueError(f"step_batch must be >= 1, got {step_batch}")
        self.lengths = list(lengths)
        self.step_batch = step_batch
        self.seed, self.shuffle, self.bucket = seed, shuffle, bucket
        self.bucket_batches, self.drop_last = bucket_batches, drop_last

    def batches(self, epoch: int) -> List[List[int]]:
        n, B = len(self.lengths), self.step_batch
        idx = list(range(n))
        if not self.shuffle:
            out = [idx[i:i + B] for i in range(0, n, B)]
        else:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            rng.shuffle(idx)
            if self.bucket:
                size = B * self.bucket_batches
                out = []
                for i in range(0, n, size):
                    chunk = sorted(idx[i:i + size], key=lambda j: self.lengths[j])
                    out.extend(chunk[k:k + B] for k in range(0, len(chunk), B))
                rng.shuffle(out)
            else:
                out = [idx[i:i + B] for i in range(0, n, B)]
        if self.drop_last:
            out = [b for b in out if len(b) == B]
        return out

    def __len__(self) -> int:
        n, B = len(self.lengths), self.step_batch
        return n // B if self.drop_last else -(-n // B)


def split_micro(indices: Sequence[int], accum: int) -> List[List[int]]:
    """One step's examples -> `accum` micro-batches (sizes differ by at most one; empty ones
    are dropped)."""
    n = len(indices)
    bounds = [round(i * n / accum) for i in range(accum + 1)]
    return [list(indices[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def shard(indices: Sequence[int], rank: int, world: int) -> List[int]:
    """A micro-batch's share for process `rank` of `world`: contiguous, sizes differing by at
    most one, so that world = 1 with the whole batch sees the same examples."""
    n = len(indices)
    a, b = round(rank * n / world), round((rank + 1) * n / world)
    return list(indices[a:b])


def chunks(seq: Sequence, size: int) -> Iterable:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
