"""Seeded fuzzers over what the trainer reads (issue 24): config values (Python API and config
files), training data files (JSONL / CSV) and checkpoint directories (--resume).

Each input must either be accepted — and then hold only values the rules allow — or be
refused with a ValueError / FileNotFoundError that names the field or the file; nothing else
may escape (TypeError, KeyError, JSONDecodeError, SafetensorError, a crash).

CI runs CONFIGS + FILES + DATA + CHECKPOINTS cases (~25 s); `MMCORE_FUZZ_SCALE=20 pytest
tests/test_fuzz_train.py` runs 20x."""
import json
import math
import os
import random
import shutil

import pytest

from mmcore.train import TrainConfig, read_records
from mmcore.train.config import _RULES, read_config_file

SCALE = int(os.environ.get("MMCORE_FUZZ_SCALE", "1"))
CONFIGS, FILES, DATA, CHECKPOINTS = 400 * SCALE, 150 * SCALE, 300 * SCALE, 120 * SCALE

VALUES = [float("nan"), float("inf"), -float("inf"), -1, 0, 1, 2, 3, 7, 2**31, 2**63, 1e30,
          -0.5, 0.5, 0.999, 1e-4, "abc", "", "1e-4", "none", True, False, None, [], [1], [1, 2],
          [2, 1, 3], ["a", "b"], ["a", "a"], [["x"], "y"], {"a": 1}, {}, "q,v", "k=v",
          '{"temperature": 0.1}', "lora", "cpu", "cuda", "auto", "max", "cosine", "fp16",
          [560, 600], [600, 560], [4, 2, 4], [0.5, 0.9], [1.0, 1.0], "x" * 300]


def _ok_value(v):
    """Values a validated config may hold: no NaN / inf anywhere, no bool where a number
    is meant (checked by the rules; here: finiteness and JSON-ability)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_ok_value(x) for x in v)
    if isinstance(v, dict):
        return all(_ok_value(x) for x in v.values())
    return v is None or isinstance(v, (str, int, bool))


def test_fuzz_config_values():
    rng = random.Random(24)
    fields = sorted(_RULES)
    accepted = refused = 0
    for _ in range(CONFIGS):
        kw = {f: rng.choice(VALUES) for f in rng.sample(fields, rng.randint(1, 3))}
        try:
            cfg = TrainConfig(**kw)
        except ValueError as e:
            assert any(f in str(e) for f in kw), (kw, str(e))
            refused += 1
            continue
        d = cfg.to_dict()
        assert all(_ok_value(v) for v in d.values()), (kw, d)
        assert TrainConfig.from_dict(json.loads(json.dumps(d))).to_dict() == d, kw
        accepted += 1
    assert accepted > 5 and refused > 100, (accepted, refused)


def _mutate_text(rng, text):
    b = bytearray(text.encode())
    kind = rng.randrange(6)
    if kind == 0 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        b = b[:rng.randrange(len(b) + 1)]
    elif kind == 2:
        b = bytearray("\ufeff".encode()) + b
    elif kind == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.choice([b"]]", b"{", b'"', b"\x00", b": nan", b"\n- 1\n", b"NaN"])
    elif kind == 4:
        return json.dumps(rng.choice([[1, 2], 3, "x", None, {"lr": rng.choice(VALUES)}]))
    return bytes(b)


def test_fuzz_config_files(tmp_path):
    rng = random.Random(25)
    good = {"epochs": 1, "lr": 0.001, "target_modules": ["q", "v"], "labels": ["a", "b"],
            "task_options": {}, "betas": [0.9, 0.99]}
    for i in range(FILES):
        ext = rng.choice([".json", ".yaml"])
        p = tmp_path / f"c{i}{ext}"
        text = json.dumps(good, indent=1)
        data = _mutate_text(rng, text)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        try:
            d, src = read_config_file(str(p), with_sources=True)
            TrainConfig.from_dict(d, src, origin=f"--config {p}")
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)
            assert p.name in msg or any(k in msg for k in good) or "config" in msg, msg


def _record(rng):
    r = {"text": rng.choice(["a b c", "", "ñ" * 5, "x" * 50])}
    r["label"] = rng.choice(["pos", "neg", 1, 0, 2.5, None, "1"])
    if rng.random() < 0.3:
        r["images"] = rng.choice(["img/a.png", ["a.png", "b.png"], "a.png;b.png"])
    return r


def _mutate_record(rng, r):
    r = dict(r)
    k = rng.choice(["text", "label", "images", "extra"])
    r[k] = rng.choice([None, 42, 1.5, float("nan"), [], ["x"], {"a": 1}, "", True, [1, 2]])
    if rng.random() < 0.2:
        r.pop(rng.choice(list(r)))
    return r


def test_fuzz_data_files(tmp_path):
    rng = random.Random(26)
    accepted = refused = 0
    for i in range(DATA):
        recs = [_record(rng) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.5:
            j = rng.randrange(len(recs))
            recs[j] = _mutate_record(rng, recs[j])
        csv_file = rng.random() < 0.3
        p = tmp_path / f"d{i}.{'csv' if csv_file else 'jsonl'}"
        if csv_file:
            text = "text,label\n" + "".join(
                f'{json.dumps(str(r.get("text")))},{r.get("label")}\n' for r in recs)
        else:
            text = "".join(json.dumps(r) + "\n" for r in recs)
        data = _mutate_text(rng, text) if rng.random() < 0.4 else text.encode()
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        try:
            out = read_records(str(p))
        except (ValueError, FileNotFoundError) as e:
            assert p.name in str(e), str(e)
            refused += 1
            continue
        accepted += 1
        seen = {}
        for r in out:
            assert isinstance(r["text"], str) and r["where"].startswith(str(p))
            lab = r["label"]
            assert lab is None or isinstance(lab, (str, int)) or (
                isinstance(lab, float) and math.isfinite(lab)), lab
            if lab is not None:  # one python type per class name
                assert seen.setdefault(str(lab), type(lab)) is type(lab)
            assert isinstance(r["images"], list) and all(isinstance(x, str) for x in r["images"])
    assert accepted > DATA // 10 and refused > DATA // 10, (accepted, refused)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from kit_train import labelled_jsonl, tiny_model_dir
    from mmcore.cli import main

    d = tmp_path_factory.mktemp("fuzz_ckpt")
    model = tiny_model_dir(d / "model", hidden=16, layers=1)
    tr = labelled_jsonl(d / "tr.jsonl", 8)
    out = d / "run"
    assert main(["train", "--model", model, "--train-file", tr, "--no-progress", "--threads",
                 "1", "--batch-size", "4", "--max-steps", "1", "--out-dir", str(out)]) == 0
    return out


def _state_mutation(rng, ts):
    key = rng.choice(["step", "epoch", "global_batch", "world_size", "format", "mode",
                      "param_groups", "scheduler", "rng", "config", "batch_in_epoch"])
    ts[key] = rng.choice([None, -5, "x", 1.5, [], {}, [1], True, 10**20, "lora"])
    return ts


def test_fuzz_checkpoints(checkpoint, tmp_path):
    """Mutate one file of a real checkpoint: the resume checks accept it (then every tensor
    loads and its checksum holds) or refuse it naming a file of the checkpoint."""
    from mmcore.train.checkpoint import (_load_tensors, check_checkpoint_files,
                                         find_checkpoint, read_index)

    rng = random.Random(27)
    root = os.path.join(checkpoint, "checkpoints")
    name = read_index(root)["last"][-1]
    files = sorted(os.path.relpath(os.path.join(a, f), checkpoint)
                   for a, _, fs in os.walk(checkpoint) if "checkpoints" in a for f in fs)
    outcome = {"ok": 0, "refused": 0}
    for i in range(CHECKPOINTS):
        d = tmp_path / f"r{i}"
        shutil.copytree(checkpoint, d, ignore=shutil.ignore_patterns("*.png"))
        rel = rng.choice(files)
        p = d / rel
        if rel.endswith("trainer_state.json") and rng.random() < 0.5:
            ts = json.loads(p.read_text())
            p.write_text(json.dumps(_state_mutation(rng, ts)))
        else:
            data = p.read_bytes()
            kind = rng.randrange(4)
            if kind == 0 and data:
                b = bytearray(data)
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                data = bytes(b)
            elif kind == 1:
                data = data[:rng.randrange(len(data) + 1)]
            elif kind == 2:
                data = rng.choice([b"", b"]]", b"\x80\x04\x95" + data[:40], b"PK\x03\x04" + data])
            else:
                data = data + rng.randbytes(rng.randint(1, 16))
            p.write_bytes(data)
        try:
            ck = find_checkpoint(str(d))
            ts = check_checkpoint_files(ck)
            for f in ("optimizer.safetensors", "rng.safetensors",
                      os.path.join("adapter", "adapter_model.safetensors")
                      if ts["mode"] == "lora" else "model.safetensors"):
                _load_tensors(os.path.join(ck, f))
            outcome["ok"] += 1
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)
            assert str(d) in msg or name in msg, (rel, msg)
            outcome["refused"] += 1
    assert outcome["refused"] > CHECKPOINTS // 2, outcome