"""`mmcore predict RUN INPUT`: use a trained run (mmcore.load_run) on new data.

    mmcore predict runs/a new.jsonl                 # classification: id, label, probability
    mmcore predict runs/a new.jsonl --json          # JSON lines: index, id, label, probs
    mmcore predict runs/a docs/ --out preds.jsonl   # a folder of text files, one document each
    cat letter.txt | mmcore predict runs/a -        # stdin: JSON lines, or one document
    mmcore predict runs/vqa questions.jsonl         # vqa / doc_figures: {"text", "images"}
    mmcore predict runs/match pairs.jsonl           # matching: {"text", "images"} -> score
    mmcore predict runs/ret queries.txt --format lines --gallery photos/ --top-k 5   # retrieval

INPUT: a JSONL / CSV / TSV file (--text-field, default the run's), a text file (one document),
a folder (each file one document; for retrieval's --gallery, each image), or "-" for stdin.
Bad input (an unknown field, an empty file, text that is not UTF-8, a run of another task, a
directory that is not a run) is one line on stderr and exit status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import textwrap
from typing import List, Optional

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = ("auto", "jsonl", "csv", "tsv", "text", "lines")


class InputError(ValueError):
    """Bad user input: reported as one line, exit 2."""


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="use a trained run on new data (classify, answer, score, rank)",
        description=textwrap.fill(
            "Run a trained model (the directory `mmcore train` wrote) over new data: "
            "classification and vqa / doc_figures print a label and per-class probabilities "
            "per record, matching a score per (text, image) pair, retrieval the top-k gallery "
            "images per text query.  Documents of any length are read whole in long-document "
            "mode, as in training.", 78),
        epilog="examples:\n"
               "  mmcore predict runs/a new.jsonl --json\n"
               "  mmcore predict runs/a letters/ --out preds.jsonl\n"
               "  mmcore predict runs/ret queries.txt --format lines --gallery photos/ "
               "--top-k 5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory written by mmcore train")
    p.add_argument("input", metavar="INPUT",
                   help="JSONL / CSV / TSV file, text file, folder of text files, or - (stdin)")
    p.add_argument("--json", action="store_true",
                   help="print JSON lines (index, id, label, probs) instead of a table")
    p.add_argument("--out", metavar="FILE", help="write JSON lines to FILE (not stdout)")
    p.add_argument("--text-field", metavar="F",
                   help="record field holding the text (default: the run's, usually text)")
    p.add_argument("--id-field", metavar="F", default="id",
                   help="record field copied to the output as id (default: id, if present)")
    p.add_argument("--image-field", metavar="F",
                   help="record field with image path(s) (default: the run's, usually images)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="how to read INPUT (default: by extension; stdin: JSON lines if it "
                        "starts with '{', else one document); lines = one document a line")
    p.add_argument("--gallery", metavar="DIR|FILE",
                   help="retrieval: images to rank (a folder, or a JSONL / CSV of records)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="retrieval: images per query (default: 5)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="documents per forward pass (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and activations (default: fp32)")
    p.add_argument("--base", metavar="DIR",
                   help="the base model dir, if it moved since training (its weights are "
                        "checked against the run's fingerprint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


# ---------------------------------------------------------------------- input

def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _format(path: str, text: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = path.lower()
    for ext, f in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"),
                   (".csv", "csv"), (".tsv", "tsv")):
        if low.endswith(ext):
            return f
    if path == "-" and text.lstrip().startswith("{"):
        return "jsonl"
    return "text"


def _parse_rows(text: str, fmt: str, where: str) -> List[dict]:
    if fmt == "jsonl":
        from .train.data import jsonl_objects

        try:
            return [r for _, r in jsonl_objects(text.splitlines(), where)]
        except ValueError as e:
            raise InputError(str(e)) from None
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    try:
        return [dict(r) for r in reader]
    except csv.Error as e:
        raise InputError(f"{where}: not valid {fmt.upper()} ({e})") from None


def _images_of(r: dict, field: str, base: str) -> list:
    v = r.get(field)
    if isinstance(v, str):
        v = [p for p in v.split(";") if p]
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in (v or [])]


def read_inputs(path: str, *, fmt: str = "auto", text_field: str = "text",
                id_field: str = "id", image_field: Optional[str] = None,
                label_field: Optional[str] = None) -> List[dict]:
    """INPUT -> [{"index", "id", "text", "images", "label"}]; InputError naming what is
    wrong.  A folder: each regular, non-hidden file (sorted) is one document, id = its name."""
    if path != "-" and not os.path.exists(path):
        raise InputError(f"input {path!r} does not exist")
    if path != "-" and os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise InputError(f"input folder {path!r} holds no files")
        out = []
        for i, n in enumerate(names):
            fp = os.path.join(path, n)
            text = _decode(_read_bytes(fp), fp)
            if not text.strip():
                raise InputError(f"{fp}: empty file (no document)")
            out.append({"index": i, "id": n, "text": text, "images": [], "label": None})
        return out
    where = "stdin" if path == "-" else path
    raw = _read_bytes(path)
    text = _decode(raw, where)
    if not text.strip():
        raise InputError(f"{where}: empty (no documents)")
    fmt = _format(path, text, fmt)
    if fmt == "text":
        return [{"index": 0, "id": None if path == "-" else os.path.basename(path),
                 "text": text, "images": [], "label": None}]
    if fmt == "lines":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return [{"index": i, "id": None, "text": ln, "images": [], "label": None}
                for i, ln in enumerate(lines)]
    rows = _parse_rows(text, fmt, where)
    if not rows:
        raise InputError(f"{where}: holds no records")
    base = os.getcwd() if path == "-" else os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(rows):
        t = r.get(text_field)
        if not isinstance(t, str):
            have = ", ".join(sorted(map(str, r))) or "none"
            raise InputError(f"{where}: record {i + 1} has no text field {text_field!r} "
                             f"(its fields: {have}; set --text-field)")
        out.append({"index": i, "id": r.get(id_field), "text": t,
                    "images": _images_of(r, image_field, base) if image_field else [],
                    "label": r.get(label_field) if label_field else None})
    return out


def gallery_images(path: str, image_field: str) -> List[str]:
    """--gallery: a folder of images (sorted) or a JSONL / CSV of records with image paths."""
    if not os.path.exists(path):
        raise InputError(f"--gallery {path!r} does not exist")
    if os.path.isdir(path):
        imgs = [os.path.join(path, n) for n in sorted(os.listdir(path))
                if n.lower().endswith(IMAGE_EXT)]
        if not imgs:
            raise InputError(f"--gallery {path!r} holds no images ({', '.join(IMAGE_EXT)})")
        return imgs
    text = _decode(_read_bytes(path), path)
    rows = _parse_rows(text, _format(path, text, "auto"), path)
    base = os.path.dirname(os.path.abspath(path))
    imgs = [p for r in rows for p in _images_of(r, image_field, base)]
    if not imgs:
        raise InputError(f"--gallery {path}: no image paths in field {image_field!r}")
    return imgs


# ---------------------------------------------------------------------- run

def _rows(model, recs, args, progress) -> List[dict]:
    """One output row per input record (or per query for retrieval)."""
    task = model.manifest["task"]
    texts = [r["text"] for r in recs]
    kw = dict(batch_size=args.batch_size, progress=progress)
    if task == "retrieval":
        images = gallery_images(args.gallery, args.image_field or
                                model.manifest.get("image_field") or "images")
        hits = model.rank(texts, images, top_k=args.top_k, **kw)
        return [{"index": r["index"], "id": r["id"], "top": h} for r, h in zip(recs, hits)]
    if task in ("vqa", "doc_figures", "matching"):
        for r in recs:
            if not r["images"]:
                raise InputError(f"{args.input}: record {r['index'] + 1} has no image (field "
                                 f"{args.image_field or model.manifest.get('image_field')!r}): "
                                 f"{args.run} is a {task} run, which needs a text and its "
                                 f"image(s) per record")
        images = [r["images"] for r in recs]
        if task == "matching":
            s = model.score(texts, images, **kw)
            return [{"index": r["index"], "id": r["id"], "score": float(x)}
                    for r, x in zip(recs, s)]
        preds = model.predict(texts, images, **kw)
    elif task == "classification":
        preds = model.predict(texts, **kw)
    else:
        raise InputError(f"{args.run} is a {task!r} run; mmcore predict handles "
                         f"classification, vqa, doc_figures, matching and retrieval runs")
    return [{"index": r["index"], "id": r["id"], **p} for r, p in zip(recs, preds)]


def _check_args(args, task: str) -> None:
    if task == "retrieval" and not args.gallery:
        raise InputError(f"{args.run} is a retrieval run: give --gallery DIR|FILE (the images "
                         f"to rank for each text query of {args.input})")
    if task != "retrieval" and args.gallery:
        raise InputError(f"--gallery: {args.run} is a {task} run; --gallery and --top-k rank "
                         f"images with a retrieval run")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")


def _table(rows: List[dict]) -> str:
    out = []
    for r in rows:
        who = str(r["id"]) if r.get("id") is not None else str(r["index"])
        if "top" in r:
            out.append(who + "\t" + "  ".join(f"{os.path.basename(h['image'])} {h['score']:.3f}"
                                              for h in r["top"]))
        elif "score" in r:
            out.append(f"{who}\t{r['score']:.4f}")
        else:
            out.append(f"{who}\t{r['label']}\t{r['probs'][r['label']]:.3f}")
    return "\n".join(out)


def run_predict(args) -> int:
    from .inference import load_run

    try:
        from .train.run_dir import read_manifest

        m = read_manifest(args.run)
        _check_args(args, m["task"])
        recs = read_inputs(args.input, fmt=args.format,
                           text_field=args.text_field or m.get("text_field") or "text",
                           id_field=args.id_field,
                           image_field=args.image_field or m.get("image_field"),
                           label_field=m.get("label_field") if m.get("labels") else None)
        if args.out and os.path.isdir(args.out):
            raise InputError(f"--out {args.out!r} is a directory; give a file name")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise InputError(f"--out {args.out!r}: its directory does not exist")
        model = load_run(args.run, base=args.base, device=args.device, dtype=args.dtype)
        progress = None if not args.no_progress else False
        rows = _rows(model, recs, args, progress)
    except (ValueError, OSError) as e:  # bad input / run dir / base: one line, nothing written
        print(f"mmcore predict: error: {e}", file=sys.stderr)
        return 2
    _accuracy_note(recs, rows)
    try:
        _emit(rows, args)
    except BrokenPipeError:  # `mmcore predict ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _emit(rows: List[dict], args) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(lines)
        os.replace(tmp, args.out)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    elif args.json:
        sys.stdout.write(lines)
    else:
        print(_table(rows))


def _accuracy_note(recs, rows) -> None:
    """When the input carries the run's label field: the accuracy on stderr."""
    pairs = [(str(r["label"]), o["label"]) for r, o in zip(recs, rows)
             if r.get("label") is not None and "label" in o]
    if pairs:
        acc = sum(a == b for a, b in pairs) / len(pairs)
        print(f"accuracy {acc:.4f} on the {len(pairs)} records that carry a label",
              file=sys.stderr)
