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
           "read_safetensors", "load_into", "save_safetensors", "resolve_dtype",
           "resolve_device"]

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


def _refuse_pickle_name(path: str) -> None:
    name = os.path.basename(path)
    if name.lower().endswith(_PICKLE_EXT):
        raise CheckpointError(
            f"{path}: refusing to load a pickle checkpoint ({name}); pickle can run arbitrary "
            "code. Convert it to safetensors first (e.g. with `safetensors.torch.save_file` in "
            "a trusted environment) and pass the .safetensors file / model dir.")


def _refuse_pickle_magic(path: str, head: bytes) -> None:
    """Called once the file has failed to parse as safetensors: name a pickle / torch.save
    archive by its magic bytes.  Never before: a valid header length such as 640 (0x280)
    starts with the bytes 80 02, which is also how a protocol-2 pickle starts."""
    kind = None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        kind = "zip (torch.save)"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = "pickle"
    if kind:
        raise CheckpointError(
            f"{path}: the file starts like a {kind} archive, not a safetensors file; refusing "
            "to load it (pickle can run arbitrary code). Convert it to safetensors first.")


def _parse_header(path: str, raw: bytes) -> dict:
    """The JSON header: an object, no NaN/Infinity, no repeated key, bounded nesting."""
    def no_const(c):
        raise CheckpointError(f"{path}: header contains {c}, not valid safetensors JSON")

    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                raise CheckpointError(f"{path}: header repeats the key {k!r}")
            d[k] = v
        return d

    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=no_const,
                            object_pairs_hook=pairs)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: header JSON is nested too deeply; corrupted or "
                              "hostile file") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); corrupted file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    meta = header.get("__metadata__")
    meta = {} if meta is None else meta  # null is allowed, as the library allows it
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings, got "
                              f"{json.dumps(meta)[:80]}")
    return header


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_safetensors(path: str) -> Dict[str, dict]:
    """Check a .safetensors file's header against its size; return {name: {dtype, shape,
    data_offsets}} (without ``__metadata__``).  Raises CheckpointError, naming the file, on
    any inconsistency: the tensors must tile the data section exactly (no gap, no overlap,
    no trailing byte), as the safetensors format requires."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    _refuse_pickle_name(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            if size < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes < "
                                      "8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: header length {n} bytes is absurd for a file "
                                      f"of {size} bytes (truncated or corrupted file)")
            header = _parse_header(path, f.read(n))
        except CheckpointError:
            _refuse_pickle_magic(path, head)  # say "pickle" where that is what it is
            raise
    data = size - 8 - n
    spans = []
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{where}: malformed header entry {str(e)[:200]}")
        dt = e["dtype"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {str(dt)[:40]}")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2 ** 48
                                                  for d in shape):
            raise CheckpointError(f"{where}: bad shape {str(shape)[:80]} (need non-negative ints)")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise CheckpointError(f"{where}: bad data_offsets {str(offs)[:80]}")
        b, end = offs
        if not 0 <= b <= end:
            raise CheckpointError(f"{where}: data_offsets {offs} are not 0 <= begin <= end")
        if end > data:
            raise CheckpointError(f"{where}: data_offsets end {end} is past the end of the data "
                                  f"({data} bytes): truncated or corrupted file")
        want = math.prod(shape) * _DTYPES[dt][0]
        if end - b != want:
            raise CheckpointError(f"{where}: {end - b} bytes in data_offsets but dtype "
                                  f"{dt} x shape {shape} needs {want}")
        spans.append((b, end, name))
        out[name] = e
    spans.sort()
    pos, prev = 0, None
    for b, e, name in spans:
        if b < pos:
            raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap in the file")
        if b > pos:
            raise CheckpointError(f"{path}: {b - pos} bytes before tensor {name!r} belong to no "
                                  "tensor (a gap in data_offsets): corrupted file")
        pos, prev = e, name
    if pos != data:
        raise CheckpointError(f"{path}: {data - pos} bytes after the last tensor belong to no "
                              "tensor (trailing bytes or a wrong header length): corrupted file")
    return out


def read_safetensors(path: str, device="cpu") -> Dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file, after validate_safetensors; any failure is a
    CheckpointError naming the file (pickle / zip files are refused, never opened)."""
    ckpt = Checkpoint(path)
    try:
        return {k: ckpt.get(k, device=device) for k in ckpt.keys()}
    finally:
        ckpt.close()


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

    def dtype(self, key) -> str:
        """The safetensors dtype tag of `key` ("F32", "BF16", "I64", ...)."""
        return self._meta[key]["dtype"]

    def get(self, key, dtype=None, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        f = self._where[key]
        try:
            h = self._handles.get(f)
            if h is None:
                h = self._handles[f] = safe_open(f, framework="pt", device="cpu")
            t = h.get_tensor(key)
        except Exception as e:  # the validated header should make this unreachable
            raise CheckpointError(f"{f}: cannot read tensor {key!r} "
                                  f"({type(e).__name__}: {e})") from None
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


def _kind(dtype) -> str:
    """float / int / bool / other: what a checkpoint tensor must share with its parameter."""
    if dtype is None:
        return "other"
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else ("int" if not dtype.is_complex else "other")


def _named_entries(module: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from module.state_dict(keep_vars=True).items()


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype):
    """None, a floating torch.dtype, or its name ("float16", "bf16", "torch.float32", ...) ->
    torch.dtype or None; a ValueError naming the argument otherwise (a dtype string used to
    reach tensor.to() as a device: "Invalid device string: 'float16'")."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not a floating dtype; use one of "
                             f"{sorted(_DTYPE_NAMES)} or a torch.dtype")
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return dtype


def resolve_device(device):
    """A device string / torch.device that exists here -> torch.device; ValueError naming it
    otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device (use 'cpu', 'cuda' or "
                         f"'cuda:N')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available")
    return dev


def load_into(module: torch.nn.Module, ckpt, *, key_map: Optional[KeyMap] = None, dtype=None,
              device="cpu", strict: bool = True) -> Tuple[list, list]:
    """Load a Checkpoint (or a path) into `module`, strictly.

    ``key_map(ckpt_key) -> model_key or None`` renames checkpoint keys (None drops a key that
    the model does not use, e.g. ``embeddings.position_ids``).  Every model parameter / buffer
    must be filled and every kept checkpoint key must be used, with identical shapes, else a
    CheckpointError lists all missing / unexpected / mismatched keys.  The module may live on
    the meta device (tensors are assigned, not copied); floating tensors are cast to `dtype`.
    Returns (missing, unexpected) — both empty when strict."""
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
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
    kinds = [f"{mapping[m]} {ckpt.dtype(mapping[m])} vs model {m} {want[m].dtype}"
             for m in sorted(set(want) & set(mapping))
             if _kind(_DTYPES[ckpt.dtype(mapping[m])][1]) != _kind(want[m].dtype)]
    if shapes or kinds or (strict and (missing or unexpected)):
        lines = [f"checkpoint {ckpt.path} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}): " + "; ".join(shapes))
        if kinds:
            lines.append(f"  dtype mismatch ({len(kinds)}; float data must fill float "
                         f"parameters, integer data integer buffers): " + "; ".join(kinds))
        lines.append("  (pass key_map= to rename or drop checkpoint keys)")
        raise CheckpointError("\n".join(lines))
    sd = {m: ckpt.get(k, dtype=dtype, device=device) for m, k in mapping.items() if m in want}
    module.load_state_dict(sd, strict=False, assign=True)
    return missing, unexpected


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(path),
              metadata=metadata)
