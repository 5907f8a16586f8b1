"""Load Hugging Face model directories from safetensors — never from pickle.

A model dir holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (+ its shards).  Every file's header is validated here
before ``safetensors.safe_open`` touches it (8-byte length bounded by the file size, JSON
without NaN/Infinity, known dtypes, non-negative shapes, data_offsets inside the file and equal
to numel x itemsize, no overlaps), so a corrupted, truncated or hostile file gives a
``CheckpointError`` naming the file and the tensor instead of a crash.  Tensors are read
lazily, one at a time, from the memory-mapped file, in the dtype / on the device the caller
chooses.  Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``, or bytes that
start like a zip / pickle stream) are refused: loading them would run arbitrary code.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["CheckpointError", "Checkpoint", "read_config", "validate_safetensors",
           "load_into", "save_safetensors"]

# safetensors dtype tag -> (itemsize in bytes, torch dtype or None when torch lacks it)
_DTYPES = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool), "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "U16": (2, None), "U32": (4, None), "U64": (8, None),
}
_PICKLE_EXT = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own bound


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


KeyMap = Callable[[str], Optional[str]]  # checkpoint key -> model key, or None to drop it


# ------------------------------------------------------------------ files


def _refuse_pickle(path: str) -> None:
    name = os.path.basename(path)
    if name.lower().endswith(_PICKLE_EXT):
        raise CheckpointError(
            f"{path}: refusing to load a pickle checkpoint ({name}); pickle can run arbitrary "
            "code. Convert it to safetensors first (e.g. with `safetensors.torch.save_file` in "
            "a trusted environment) and pass the .safetensors file / model dir.")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(
            f"{path}: the file starts like a {'zip (torch.save)' if head == b'PK' else 'pickle'}"
            " archive, not a safetensors file; refusing to load it (pickle can run arbitrary "
            "code). Convert it to safetensors first.")


def validate_safetensors(path: str) -> Dict[str, dict]:
    """Check a .safetensors file's header against its size; return {name: {dtype, shape,
    data_offsets}} (without ``__metadata__``).  Raises CheckpointError on any inconsistency."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    _refuse_pickle(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes < 8-byte header"
                              " length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} bytes is absurd for a file of "
                                  f"{size} bytes (truncated or corrupted file)")
        raw = f.read(n)

    def no_const(c):
        raise CheckpointError(f"{path}: header contains {c}, not valid safetensors JSON")

    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=no_const)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); corrupted file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    data = size - 8 - n
    spans = []
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: malformed header entry {e!r}")
        if e.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {e.get('dtype')!r}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 48
                for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r} (need non-negative ints)")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(f"{where}: bad data_offsets {offs!r}")
        b, end = offs
        if not 0 <= b <= end:
            raise CheckpointError(f"{where}: data_offsets {offs} are not 0 <= begin <= end")
        if end > data:
            raise CheckpointError(f"{where}: data_offsets end {end} is past the end of the data "
                                  f"({data} bytes): truncated or corrupted file")
        want = math.prod(shape) * _DTYPES[e["dtype"]][0]
        if end - b != want:
            raise CheckpointError(f"{where}: {end - b} bytes in data_offsets but dtype "
                                  f"{e['dtype']} x shape {shape} needs {want}")
        spans.append((b, end, name))
        out[name] = e
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return out


class Checkpoint:
    """Lazy view over the safetensors file(s) of a model dir (or one .safetensors file).

    ``ckpt.keys()``, ``ckpt.shape(key)``, ``ckpt.get(key, dtype=None, device="cpu")``.
    Headers are validated on open; tensors are read one at a time from memory-mapped files."""

    def __init__(self, path: str):
        path = os.fspath(path)
        self.path = path
        self._where: Dict[str, str] = {}  # key -> file
        self._meta: Dict[str, dict] = {}
        for f in self._files(path):
            for k, e in validate_safetensors(f).items():
                if k in self._where:
                    raise CheckpointError(f"{path}: tensor {k!r} appears in two shards")
                self._where[k] = f
                self._meta[k] = e
        self._handles = {}

    @staticmethod
    def _files(path):
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a file or model directory")
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    wm = json.load(fh)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e!r})") from None
            files = []
            for shard in dict.fromkeys(wm.values()):
                if os.path.basename(shard) != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file "
                                          "name in the model dir")
                files.append(os.path.join(path, shard))
            return files
        found = [n for n in sorted(os.listdir(path)) if n.lower().endswith(_PICKLE_EXT)]
        if found:
            raise CheckpointError(f"{path}: only pickle weights here ({', '.join(found)}); "
                                  "refusing to load pickle (it can run arbitrary code). "
                                  "Convert them to model.safetensors.")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def keys(self):
        return list(self._where)

    def shape(self, key) -> Tuple[int, ...]:
        return tuple(self._meta[key]["shape"])

    def get(self, key, dtype=None, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        f = self._where[key]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(f, framework="pt", device="cpu")
        t = h.get_tensor(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def close(self):
        self._handles.clear()


def read_config(model_dir: str) -> dict:
    p = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(p):
        raise CheckpointError(f"{model_dir}: no config.json")
    with open(p) as f:
        return json.load(f)


# ------------------------------------------------------------------ into a module


def _named_entries(module: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from module.state_dict(keep_vars=True).items()


def load_into(module: torch.nn.Module, ckpt, *, key_map: Optional[KeyMap] = None, dtype=None,
              device="cpu", strict: bool = True) -> Tuple[list, list]:
    """Load a Checkpoint (or a path) into `module`, strictly.

    ``key_map(ckpt_key) -> model_key or None`` renames checkpoint keys (None drops a key that
    the model does not use, e.g. ``embeddings.position_ids``).  Every model parameter / buffer
    must be filled and every kept checkpoint key must be used, with identical shapes, else a
    CheckpointError lists all missing / unexpected / mismatched keys.  The module may live on
    the meta device (tensors are assigned, not copied); floating tensors are cast to `dtype`.
    Returns (missing, unexpected) — both empty when strict."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    want = dict(_named_entries(module))
    mapping = {}
    for k in ckpt.keys():
        m = key_map(k) if key_map is not None else k
        if m is None:
            continue
        if m in mapping:
            raise CheckpointError(f"{ckpt.path}: keys {mapping[m]!r} and {k!r} both map to {m!r}")
        mapping[m] = k
    missing = sorted(set(want) - set(mapping))
    unexpected = sorted(mapping[m] for m in set(mapping) - set(want))
    shapes = [f"{mapping[m]} {list(ckpt.shape(mapping[m]))} vs model {m} {list(want[m].shape)}"
              for m in sorted(set(want) & set(mapping))
              if ckpt.shape(mapping[m]) != tuple(want[m].shape)]
    if shapes or (strict and (missing or unexpected)):
        lines = [f"checkpoint {ckpt.path} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}): " + "; ".join(shapes))
        lines.append("  (pass key_map= to rename or drop checkpoint keys)")
        raise CheckpointError("\n".join(lines))
    sd = {m: ckpt.get(k, dtype=dtype, device=device) for m, k in mapping.items() if m in want}
    module.load_state_dict(sd, strict=False, assign=True)
    return missing, unexpected


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(path),
              metadata=metadata)
