"""Run every op's benchmark (or some): the same as `mmcore bench`.

    python benchmarks/run.py [--op window_attention] [--quick] [--device cuda]
"""
import sys

from mmcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
