"""`mmcore read --explain` / read(explain=...): attention rows of a real encoder layer against a
dense float64 oracle, and the heatmap PNG over document tokens and image patches."""
import json
import math
import os

import pytest
import torch

from kit import assert_close, window_mask
from mmcore import cli_read, reading
from mmcore.explain import encoder_attention_rows, fusion_attention_rows
from mmcore.models import MultimodalReader, TextEncoder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer BERT (random weights, the MiniLM tokenizer): reads like MiniLM, runs fast."""
    from kit_train import tiny_model_dir

    d = tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"), hidden=32, layers=2, heads=4)
    return d, reading.Tokenizer(d), TextEncoder.from_pretrained(d)


def _dense_rows(enc, ids, layer, rows, window, G, dtype):
    """Layer `layer`'s softmax rows from its input states, dense, in `dtype`."""
    x = enc.encode_long(ids, window=window, global_tokens=G, layers=layer)  # (N, H)
    a = enc.layers[layer].attn
    N, H = x.shape
    q = torch.nn.functional.linear(x.to(dtype), a.q.weight.to(dtype), a.q.bias.to(dtype))
    k = torch.nn.functional.linear(x.to(dtype), a.k.weight.to(dtype), a.k.bias.to(dtype))
    q, k = (t.view(N, a.h, -1).transpose(0, 1) for t in (q, k))  # (h, N, D)
    s = q @ k.transpose(-1, -2) / math.sqrt(H // a.h)
    mask = window_mask(1, N, N, window[0], window[1], False, G)[0]
    return s.masked_fill(~mask, float("-inf")).softmax(-1)[:, rows]


def test_encoder_rows_equal_the_dense_oracle(tiny):
    """The last layer over 700 tokens (past the 128-position table: wrapped positions),
    window (32, 32), [CLS] global: the rows of [CLS] (sees everything), a first token, a
    middle and the last token."""
    d, tok, enc = tiny
    doc = reading.needle_document(700, seed=3, tokenizer=tok)
    ids = torch.tensor([tok.document(doc.text)[0]])
    rows = [0, 1, 350, ids.shape[1] - 1]
    p = encoder_attention_rows(enc, ids, rows, layer=-1, window=(32, 32))
    assert p.shape == (4, 4, ids.shape[1])
    L = len(enc.layers) - 1
    with torch.no_grad():
        oracle = _dense_rows(enc, ids, L, rows, (32, 32), 1, torch.float64)
        base = _dense_rows(enc, ids, L, rows, (32, 32), 1, torch.float32)
    assert_close("layer rows", p, oracle, base)
    assert (p[:, 2, :350 - 33].sum() == p[:, 2, 0].sum())  # only [CLS] outside the window


def test_read_explain_png_with_fused_image(tmp_path, tiny, capsys):
    """A MultimodalReader fusing one image: the PNG is written, its rows are [CLS] + the best
    passage's tokens, and the image's patch attention is reported (its mass sums to 1 with
    the CLS token's, per text row, averaged)."""
    from test_read import _png, _tiny_clip

    d, tok, _ = tiny
    vis, img = _tiny_clip(tmp_path / "clip"), _png(tmp_path / "fig.png")
    r = MultimodalReader.build(d, vis, n_fusion=1, n_heads=2, n_labels=2, labels=["a", "b"])
    r.save(tmp_path / "reader")
    doc = reading.needle_document(600, seed=1, tokenizer=tok)
    (tmp_path / "doc.txt").write_text(doc.text)
    png = tmp_path / "map.png"
    assert cli_read.main([str(tmp_path / "doc.txt"), "-q", doc.query, "--model",
                          str(tmp_path / "reader"), "--image", str(img), "--explain", str(png),
                          "--json", "--window", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    ex = out["explain"]
    assert os.path.getsize(png) > 10_000 and ex["png"] == str(png)
    assert ex["rows"][0] == 0 and ex["row_tokens"][0] == "[CLS]" and len(ex["rows"]) > 3
    top = out["passages"][0]
    ids, offs = tok.document(doc.text)
    assert all(top["start"] <= offs[t][0] < top["end"] for t in ex["rows"][1:])
    assert len(ex["images"]) == 1
    i = ex["images"][0]
    assert i["cls"] + i["patches"] == pytest.approx(1.0, abs=1e-4)


def test_fusion_rows_sum_to_one():
    torch.manual_seed(0)
    from mmcore.nn import CoAttention

    layer = CoAttention(32, 4)
    h_t, h_v = torch.randn(1, 30, 32), torch.randn(1, 9, 32)
    p_t, p_v = fusion_attention_rows(layer, h_t, h_v, [0, 29], [3])
    assert p_t.shape == (4, 2, 9) and p_v.shape == (4, 1, 30)
    assert torch.allclose(p_t.sum(-1), torch.ones(4, 2), atol=1e-5)
    assert torch.allclose(p_v.sum(-1), torch.ones(4, 1), atol=1e-5)


def test_explain_layer_out_of_range(tiny):
    _, _, enc = tiny
    with pytest.raises(ValueError, match="layer"):
        encoder_attention_rows(enc, torch.tensor([[101, 102]]), [0], layer=2)
