"""mmcore's benchmarks, installed as the package `mmcore.benchmarks` (setup.py maps this
folder; in a source tree mmcore/__init__.py maps it the same way).  `mmcore bench` runs them;
the files can also be run as scripts.  docs/benchmarks.md says how to read the results."""
