"""The `torch` backend: pure-PyTorch, chunked, always available; the oracle's twin."""
