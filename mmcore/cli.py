"""The `mmcore` command: info | bench | read | train | predict | export | index | search."""
from __future__ import annotations

import argparse
import sys

from .cli_bench import (BENCH_MODULES, add_bench_parser, add_info_parser,  # noqa: F401
                        run_bench, run_info)


def cmd_info(args) -> int:
    return run_info(args)


def cmd_bench(args) -> int:
    return run_bench(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmcore", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_info_parser(sub)
    add_bench_parser(sub)
    from .cli_read import add_read_parser, run_read

    add_read_parser(sub).set_defaults(func=run_read)
    from .cli_train import add_train_parser, run_train

    add_train_parser(sub).set_defaults(func=run_train)
    from .cli_predict import add_predict_parser, run_predict
    from .export import add_export_parser, run_export

    add_predict_parser(sub).set_defaults(func=run_predict)
    add_export_parser(sub).set_defaults(func=run_export)
    from .cli_index import add_index_parser, add_search_parser, run_index, run_search

    add_index_parser(sub).set_defaults(func=run_index)
    add_search_parser(sub).set_defaults(func=run_search)
    args = ap.parse_args(argv)
    from ._optional import MissingDependency

    try:
        if args.cmd == "info":
            return cmd_info(args)
        if args.cmd == "bench":
            return cmd_bench(args)
        return args.func(args)
    except MissingDependency as e:  # an optional package: one line naming the extra
        print(f"mmcore {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
