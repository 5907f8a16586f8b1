"""Loader: strict keys, renames, shards, dtype; every malformed / pickle file is a clear error."""
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from mmcore.models import Checkpoint, CheckpointError, load_into, validate_safetensors


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.LayerNorm(3)


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "b.weight": torch.randn(3, generator=g), "b.bias": torch.randn(3, generator=g)}


def _raw(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_load_roundtrip_dtype_and_meta(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "model.safetensors")
    with torch.device("meta"):
        m = Tiny()
    load_into(m, tmp_path, dtype=torch.float64)
    assert m.a.weight.dtype == torch.float64 and m.a.weight.device.type == "cpu"
    torch.testing.assert_close(m.a.weight, sd["a.weight"].double())
    assert m.a.weight.requires_grad


def test_sharded_index(tmp_path):
    sd = _sd()
    save_file({k: sd[k] for k in ("a.weight", "a.bias")}, tmp_path / "s1.safetensors")
    save_file({k: sd[k] for k in ("b.weight", "b.bias")}, tmp_path / "s2.safetensors")
    wm = {k: ("s1.safetensors" if k.startswith("a.") else "s2.safetensors") for k in sd}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    m = Tiny()
    load_into(m, tmp_path)
    torch.testing.assert_close(m.b.bias, sd["b.bias"])


def test_missing_and_unexpected_keys_listed(tmp_path):
    sd = _sd()
    del sd["b.bias"]
    sd["c.extra"] = torch.ones(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_into(Tiny(), tmp_path)
    msg = str(e.value)
    assert "missing keys (1): b.bias" in msg and "unexpected keys (1): c.extra" in msg


def test_key_map_renames_and_drops(tmp_path):
    sd = {("old." + k): v for k, v in _sd().items()}
    sd["old.position_ids"] = torch.arange(3)
    save_file(sd, tmp_path / "model.safetensors")
    m = Tiny()
    load_into(m, tmp_path, key_map=lambda k: None if k.endswith("position_ids") else k[4:])
    torch.testing.assert_close(m.a.bias, sd["old.a.bias"])


def test_wrong_shape(tmp_path):
    sd = _sd()
    sd["a.weight"] = torch.randn(3, 5)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch .*a\.weight \[3, 5\] vs model"):
        load_into(Tiny(), tmp_path)


def test_truncated_file(tmp_path):
    save_file(_sd(), tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="past the end of the data"):
        load_into(Tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("case,match", [
    ("huge_len", "header length .* is absurd"),
    ("nan", "NaN"),
    ("not_json", "not valid JSON"),
    ("bad_shape", "bad shape"),
    ("size_mismatch", "needs 48"),
    ("offsets_past_end", "past the end"),
    ("overlap", "overlap"),
    ("dtype", "unknown dtype"),
])
def test_absurd_headers(tmp_path, case, match):
    p = tmp_path / "w.safetensors"
    data = bytes(96)
    ok = {"x": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}
    if case == "huge_len":
        p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    elif case == "nan":
        h = b'{"x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 48]}}'
        p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{oops" + data)
    elif case == "bad_shape":
        _raw(p, {"x": {"dtype": "F32", "shape": [-3, 4], "data_offsets": [0, 48]}}, data)
    elif case == "size_mismatch":
        _raw(p, {"x": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}}, data)
    elif case == "offsets_past_end":
        _raw(p, {"x": {"dtype": "F32", "shape": [3, 4], "data_offsets": [2 ** 40, 2 ** 40 + 48]}},
             data)
    elif case == "overlap":
        _raw(p, dict(ok, y={"dtype": "F32", "shape": [12], "data_offsets": [8, 56]}), data)
    elif case == "dtype":
        _raw(p, {"x": {"dtype": "F33", "shape": [3, 4], "data_offsets": [0, 48]}}, data)
    with pytest.raises(CheckpointError, match=match):
        validate_safetensors(str(p))


def test_valid_raw_header_passes(tmp_path):
    p = _raw(tmp_path / "w.safetensors",
             {"x": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "__metadata__": {"format": "pt"}}, bytes(48))
    assert list(validate_safetensors(str(p))) == ["x"]
    assert Checkpoint(p).get("x").shape == (3, 4)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "w.ckpt"])
def test_pickle_by_extension(tmp_path, name):
    torch.save(_sd(), tmp_path / name)
    with pytest.raises(CheckpointError, match="refusing to load"):
        Checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="only pickle weights"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["torch_zip", "pickle"])
def test_pickle_disguised_as_safetensors(tmp_path, kind):
    p = tmp_path / "model.safetensors"
    if kind == "torch_zip":
        torch.save(_sd(), p)
    else:
        p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_into(Tiny(), tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file|not a file"):
        Checkpoint(tmp_path / "nope.safetensors")
