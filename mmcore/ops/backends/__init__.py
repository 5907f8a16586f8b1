"""Backend declarations, one file per op; each registers an OpImpl per backend it has.

_loaders.py says whether each backend's machinery (Triton, mmcore._C, CUDA) is present."""
