"""Issue 16, items 11 and 15: safetensors files the loader refused though valid, and malformed
files that escaped as raw errors without the file's name."""
import json
import pickle
import struct

import pytest
import torch

from mmcore.models.loading import (Checkpoint, CheckpointError, load_into, read_safetensors,
                                   validate_safetensors)


def write(path, header: dict, data: bytes, pad_to=None, raw_header=None):
    """A safetensors file from a header dict (or raw header bytes), space-padded to pad_to."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    if pad_to is not None:
        assert len(h) <= pad_to
        h += b" " * (pad_to - len(h))
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def two_tensors():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([7, 8], dtype=torch.int64)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    return header, a.numpy().tobytes() + b.numpy().tobytes(), a, b


@pytest.mark.parametrize("hlen", [640, 896, 1152, 1408])
def test_header_length_128_mod_256_loads(tmp_path, hlen):
    """Issue 16, item 11: a valid file whose header is 640, 896, 1152 or 1408 bytes long
    (length = 128 mod 256) starts with the bytes 80 0N -- the start of a protocol-N pickle --
    and was refused as "a pickle/zip" (peft loads the same file).  Magic bytes are only
    looked at once a file fails to parse as safetensors."""
    header, data, a, b = two_tensors()
    header["__metadata__"] = {"format": "pt"}
    p = write(tmp_path / "m.safetensors", header, data, pad_to=hlen)
    head = open(p, "rb").read(2)
    assert head[0] == 0x80 and 2 <= head[1] <= 5  # what a pickle of protocol 2-5 starts with
    assert set(validate_safetensors(p)) == {"a", "b"}
    t = read_safetensors(p)
    assert torch.equal(t["a"], a) and torch.equal(t["b"], b)


def test_pickle_and_zip_still_refused_by_magic(tmp_path):
    """Guard for the item-11 fix (passes at 34b1b06 too): a torch.save zip and a protocol-2 pickle under a
    .safetensors name are still refused -- by their real magic bytes -- naming the file."""
    z = tmp_path / "zip.safetensors"
    torch.save({"a": torch.zeros(2)}, z)
    pk = tmp_path / "pk.safetensors"
    pk.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2))
    for path, kind in ((z, "zip"), (pk, "pickle")):
        with pytest.raises(CheckpointError, match=kind) as e:
            validate_safetensors(str(path))
        assert str(path) in str(e.value)


def _malformed(tmp_path):
    header, data, _, _ = two_tensors()
    cases = {}
    h = json.loads(json.dumps(header))
    h["a"]["dtype"] = ["F32"]
    cases["dtype_list"] = write(tmp_path / "dtype_list.safetensors", h, data)
    deep = b'{"__metadata__": {}, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    cases["deep_json"] = write(tmp_path / "deep.safetensors", None, data, raw_header=deep)
    cases["trailing_bytes"] = write(tmp_path / "trailing.safetensors", header, data + b"\0" * 8)
    h = json.loads(json.dumps(header))
    h["b"]["data_offsets"] = [32, 48]
    cases["offset_gap"] = write(tmp_path / "gap.safetensors", h, data + b"\0" * 8)
    for name, meta in (("meta_list", [1, 2]), ("meta_str", "x"), ("meta_int_value", {"k": 1})):
        h = dict(header, __metadata__=meta)
        cases[name] = write(tmp_path / f"{name}.safetensors", h, data)
    h = json.loads(json.dumps(header))
    h["b"]["data_offsets"] = [20, 36]
    cases["overlap"] = write(tmp_path / "overlap.safetensors", h, data[:36])
    cases["dup_key"] = write(tmp_path / "dup.safetensors", None, data, raw_header=(
        json.dumps(header)[:-1] + ', "a": ' + json.dumps(header["a"]) + "}").encode())
    return cases


def test_malformed_files_give_errors_naming_the_file(tmp_path):
    """Issue 15: "dtype": ["F32"] raised TypeError (unhashable), JSON nested 5,000 deep a
    RecursionError, trailing bytes / offset gaps / a non-dict __metadata__ a raw
    SafetensorError without the file name.  Each is now a CheckpointError naming the file,
    whether the header is validated alone or the file is opened."""
    for case, path in _malformed(tmp_path).items():
        for fn in (validate_safetensors, Checkpoint, read_safetensors):
            with pytest.raises(CheckpointError) as e:
                fn(path)
            assert path in str(e.value), f"{case}: {e.value}"


def test_integer_data_for_a_float_parameter(tmp_path):
    """Issue 15: I32 data for a float parameter escaped as a load_state_dict error; it is
    now a CheckpointError naming the file, the key and both dtypes."""
    lin = torch.nn.Linear(3, 2)
    h = {"weight": {"dtype": "I32", "shape": [2, 3], "data_offsets": [0, 24]},
         "bias": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    p = write(tmp_path / "lin.safetensors", h, bytes(32))
    with pytest.raises(CheckpointError, match=r"weight I32 vs model weight torch.float32") as e:
        load_into(lin, p)
    assert p in str(e.value)
