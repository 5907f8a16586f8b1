"""mmcore.read / `mmcore read`: the needle demo, passages, the CLI, images and reader heads."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from mmcore import cli_read, reading  # noqa: E402
from mmcore.models import MultimodalReader, TextEncoder, default_text_model  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    d = default_text_model()
    return d, reading.Tokenizer(d), TextEncoder.from_pretrained(d)


def test_needle_document_reproducible(minilm):
    d, tok, _ = minilm
    a = reading.needle_document(3000, seed=5, tokenizer=tok)
    b = reading.needle_document(3000, seed=5, tokenizer=tok)
    c = reading.needle_document(3000, seed=6, tokenizer=tok)
    assert a.text == b.text and a.text != c.text
    assert a.text[a.needle_start:a.needle_end] == a.needle and a.answer in a.needle
    ids, offs = tok.document(a.text)
    assert abs(len(ids) - 3000) <= 30 and len(ids) == a.tokens
    assert a.needle_token > 512 and offs[a.needle_token][0] == a.needle_start


def test_split_passages_offsets(minilm):
    _, tok, _ = minilm
    text = "Short one. This sentence is long enough to stand on its own as a passage!\nAnd a " \
           "third line without a full stop"
    ids, offs = tok.document(text)
    spans = reading.split_passages(text, offs, min_tokens=4)
    assert [text[a:b] for _, _, a, b in spans] == [
        "Short one. This sentence is long enough to stand on its own as a passage!",
        "And a third line without a full stop"]
    assert spans[0][0] == 1 and spans[-1][1] == len(ids) - 1


@pytest.mark.slow
def test_needle_found_at_rank_1_8k(minilm):
    """The demo's claim at 8k tokens: long-document mode finds the needle at rank 1; reading
    only the first 512 tokens cannot (the needle sits past token 512 by construction)."""
    d, tok, enc = minilm
    doc = reading.needle_document(8192, seed=0, tokenizer=tok)
    res = reading.read(doc.text, doc.query, encoder=enc, tokenizer=tok, progress=False)
    top = res["passages"][0]
    assert top["start"] <= doc.needle_start < top["end"], res["passages"]
    assert res["tokens"] == doc.tokens and res["backend"] and res["peak_memory_bytes"] >= 0
    cut = reading.read(doc.text, doc.query, encoder=enc, tokenizer=tok, progress=False,
                       truncate=512)
    assert cut["tokens"] == 512 and doc.needle_token > 512
    assert all(p["end"] <= doc.needle_start for p in cut["passages"])


def test_long_read_equals_full_attention_when_window_covers(minilm):
    _, tok, enc = minilm
    doc = reading.needle_document(600, seed=2, tokenizer=tok)
    a = reading.read(doc.text, doc.query, encoder=enc, tokenizer=tok, progress=False,
                     window=(600, 600))
    b = reading.read(doc.text, doc.query, encoder=enc, tokenizer=tok, progress=False,
                     window=None)
    assert [p["start"] for p in a["passages"]] == [p["start"] for p in b["passages"]]
    for p, q in zip(a["passages"], b["passages"]):
        assert abs(p["score"] - q["score"]) < 1e-3


def test_cli_file_stdin_json(tmp_path, minilm, capsys, monkeypatch):
    f = tmp_path / "doc.txt"
    f.write_text("Cats sleep most of the day in warm places. The stock market fell sharply "
                 "on Tuesday after the announcement. Volcanoes erupt molten rock from deep "
                 "below the crust.")
    assert cli_read.main([str(f), "--query", "Why did share prices drop?", "--json",
                          "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passages"][0]["text"].startswith("The stock market fell")
    assert set(out) >= {"tokens", "tokens_per_s", "peak_memory_bytes", "backend", "window"}
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(f.read_text()))
    assert cli_read.main(["-", "--query", "hot rock", "--window", "0"]) == 0
    assert "Volcanoes erupt" in capsys.readouterr().out.splitlines()[2]
    assert cli_read.main([str(f)]) == 2  # no --query
    assert cli_read.main([str(f), "-q", "x", "--image", str(f)]) == 1
    assert "--vision-model" in capsys.readouterr().err


def _tiny_clip(path):
    torch.manual_seed(0)
    v = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8)).eval()
    v.save_pretrained(path)
    return path


def _png(path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8")).save(
        path)
    return path


def test_read_with_images_and_reader_heads(tmp_path, minilm, capsys):
    d, tok, _ = minilm
    vis, img = _tiny_clip(tmp_path / "clip"), _png(tmp_path / "fig.png")
    text = "The bridge was closed for repairs in May. The harvest of apples was large. " * 3
    # a plain text model: images are encoded, not fused
    res = reading.read(text, "apple harvest", model=d, images=[img], vision_model=vis,
                       progress=False)
    assert res["images"][0]["tokens"] == 5 and res["fused_images"] is False
    # a MultimodalReader dir: images fused, heads answer
    r = MultimodalReader.build(d, vis, n_fusion=1, n_heads=4, n_labels=2, labels=["a", "b"])
    r.save(tmp_path / "reader")
    assert cli_read.main([str(_write(tmp_path / "t.txt", text)), "-q", "apple harvest",
                          "--model", str(tmp_path / "reader"), "--image", str(img),
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fused_images"] is True and out["classification"]["label"] in ("a", "b")
    s = out["span"]
    assert 0 <= s["start"] < s["end"] <= len(text) and s["text"] == text[s["start"]:s["end"]]


def _write(p, text):
    p.write_text(text)
    return p


def test_demo_cli_small(capsys):
    """`mmcore read --tokens 2048` (the embedded demo, small): found at rank 1, exit 0."""
    assert cli_read.main(["--tokens", "2048", "--seed", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "YES, at rank 1" in out and "cannot find it" in out and "tokens/s" in out
