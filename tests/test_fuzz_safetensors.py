"""Seeded fuzzer over the safetensors loader (issue 16): byte flips, truncations, header
mutations, pickle / zip prefixes.  Every file must either load -- each tensor's bytes equal
to the bytes its header points at -- or raise a CheckpointError naming the file.  Nothing
else may escape (no TypeError, RecursionError, raw SafetensorError, crash), and a file that
the safetensors library itself reads, unambiguously, must not be refused.

CI runs FILES files; `MMCORE_FUZZ_SCALE=20 pytest tests/test_fuzz_safetensors.py` runs 20x."""
import json
import os
import random
import struct

import pytest
import torch

from mmcore.models.loading import Checkpoint, CheckpointError

SCALE = int(os.environ.get("MMCORE_FUZZ_SCALE", "1"))
FILES = 1200 * SCALE
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
          "I8": torch.int8, "BOOL": torch.bool}
ITEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1,
        "BOOL": 1}


def valid_file(rng):
    """(header dict, data bytes) of a well-formed file: 1-4 tensors, some empty."""
    header, data = {}, b""
    for i in range(rng.randint(1, 4)):
        dt = rng.choice(sorted(DTYPES))
        shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3))]
        n = ITEM[dt]
        for d in shape:
            n *= d
        header[rng.choice(["w", "layer.0.weight", "bias", "ñame", "a" * 40]) + str(i)] = {
            "dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += rng.randbytes(n)
    if rng.random() < 0.5:
        header["__metadata__"] = {"format": "pt"}
    return header, data


def pack(header_bytes, data, pad=0):
    h = header_bytes + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


def mutate_header(rng, header):
    """A structural change to one entry of the header (may leave it valid)."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    e = h[rng.choice(names)]
    kind = rng.randrange(14)
    if kind == 0:
        e["dtype"] = rng.choice(["F33", ["F32"], 4, None, "U16", "F8_E4M3", "f32"])
    elif kind == 1:
        e["shape"] = rng.choice([[-1], [1.5], ["2"], [2 ** 60, 2 ** 60], None, [True], 3])
    elif kind == 2:
        b, end = e["data_offsets"]
        e["data_offsets"] = rng.choice([[end, b], [b, end + 1], [b + 1, end + 1], [b],
                                        [b, end, 0], [str(b), end], [b - 1, end - 1], None])
    elif kind == 3:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 4:
        e["extra"] = rng.choice([1, "x", [1]])
    elif kind == 5:
        h["__metadata__"] = rng.choice([[1, 2], "x", 4, None, {"k": 1}, {"k": {"n": "x"}}])
    elif kind == 6:
        h[rng.choice(names)] = rng.choice([[], "x", 1, None])
    elif kind == 7:
        h["z" * rng.randint(1, 4)] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif kind == 8:
        return b"{" * rng.randint(1, 6000) + b"}"
    elif kind == 9:
        return json.dumps(h)[:-1].encode() + b', "nan": NaN}'
    elif kind == 10:
        return rng.choice([b"[]", b"null", b"4", b'"x"', b"", b"{}", b"\xff\xfe{}"])
    elif kind == 11:
        return b" \n" + json.dumps(h).encode()
    elif kind == 12:  # a repeated key (ambiguous: the library keeps one of the two)
        k = rng.choice(names)
        return (json.dumps(h)[:-1] + f', {json.dumps(k)}: {json.dumps(h[k])}}}').encode()
    else:
        e["data_offsets"] = [x + rng.choice([-8, 8, 2 ** 40]) for x in e["data_offsets"]]
    return json.dumps(h).encode()


def mutate(rng, header, data):
    """bytes of a file: valid or damaged in one of several ways -> (bytes, note)."""
    raw = pack(json.dumps(header).encode(), data, pad=rng.choice([0, 0, 3, 7, 128]))
    kind = rng.randrange(9)
    if kind == 0:
        return raw, "valid"
    if kind == 1:  # flip bytes anywhere
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), "flip"
    if kind == 2:  # flip bytes in the length field or header
        b = bytearray(raw)
        hi = min(len(b), 8 + len(json.dumps(header)) + 1)
        b[rng.randrange(hi)] ^= 1 << rng.randrange(8)
        return bytes(b), "flip header"
    if kind == 3:
        return raw[:rng.randrange(len(raw))], "truncate"
    if kind == 4:
        return raw + rng.randbytes(rng.randint(1, 64)), "trailing"
    if kind == 5:  # header length field rewritten
        n = struct.unpack("<Q", raw[:8])[0]
        v = rng.choice([n + rng.randint(-9, 9), 0, 2 ** 63, 2 ** 64 - 1, len(raw), 128 + 256 * 3])
        return struct.pack("<Q", max(0, min(v, 2 ** 64 - 1))) + raw[8:], "length"
    if kind == 6:
        return rng.choice([b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04"]) + raw[2:], "magic"
    if kind == 7:  # a valid header of length 128 mod 256 (starts 80 02 / 80 03 ...)
        hb = json.dumps(header).encode()
        target = 128 + 256 * ((len(hb) + 255) // 256)
        return pack(hb, data, pad=target - len(hb)), "valid 128 mod 256"
    return pack(mutate_header(rng, header), data), "header"


def expected_bytes(path):
    """{name: bytes} by reading the file's own header (used only after a successful load)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])
    base = 8 + n
    return {k: raw[base + e["data_offsets"][0]:base + e["data_offsets"][1]]
            for k, e in h.items() if k != "__metadata__"}


def library_reads(path):
    """Whether the safetensors library reads every tensor of the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


def check(path, note):
    try:
        ck = Checkpoint(path)
        got = {k: ck.get(k) for k in ck.keys()}
        ck.close()
    except CheckpointError as e:
        assert path in str(e), f"{note}: error does not name the file: {e}"
        ambiguous = "repeats the key" in str(e)
        assert ambiguous or not library_reads(path), \
            f"{note}: a file the safetensors library reads was refused: {e}"
        return "refused"
    want = expected_bytes(path)
    assert set(got) == set(want), note
    for k, t in got.items():
        assert t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == want[k], (note, k)
    return "loaded"


@pytest.mark.parametrize("part", range(4))
def test_fuzz_safetensors_loader(tmp_path, part):
    """FILES seeded files in four parts: each loads byte-exact or is refused naming the file."""
    rng = random.Random(1600 + part)
    seen = {"loaded": 0, "refused": 0}
    for i in range(FILES // 4):
        header, data = valid_file(rng)
        raw, note = mutate(rng, header, data)
        path = str(tmp_path / f"f{i % 50}.safetensors")
        with open(path, "wb") as f:
            f.write(raw)
        seen[check(path, f"file {i} ({note})")] += 1
    assert seen["loaded"] > FILES // 20 and seen["refused"] > FILES // 20, seen
