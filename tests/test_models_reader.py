"""MultimodalReader: fwd + bwd through text, vision, fusion and every head; save / load."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmcore.models import MultimodalReader  # noqa: E402
from mmcore.nn import CoAttention  # noqa: E402
from kit import assert_close  # noqa: E402


@pytest.fixture
def dirs(tmp_path):
    torch.manual_seed(0)
    t = transformers.BertModel(transformers.BertConfig(
        vocab_size=90, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).eval()
    v = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8)).eval()
    t.save_pretrained(tmp_path / "text")
    v.save_pretrained(tmp_path / "vision")
    return tmp_path


def test_reader_fwd_bwd(dirs):
    r = MultimodalReader.build(dirs / "text", dirs / "vision", n_fusion=2, n_heads=4,
                               n_labels=3)
    ids = torch.randint(1, 90, (2, 37))
    lens = torch.tensor([37, 20])
    pixels = torch.randn(2, 2, 3, 16, 16)  # two images per sample
    out = r(ids, lens, pixels, image_counts=[2, 1], window=(4, 4), global_tokens=1)
    assert out.logits.shape == (2, 3) and out.start_logits.shape == (2, 37)
    assert out.image_hidden.shape == (2, 10, 48)
    assert torch.isinf(out.start_logits[1, 20:]).all() and torch.isfinite(out.start_logits[1, :20]).all()
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(2))
    loss = (out.logits.logsumexp(-1).sum() + out.start_logits[0].logsumexp(-1)
            + out.end_logits[1, :20].logsumexp(-1) + out.embedding.sum())
    loss.backward()
    for name, p in r.named_parameters():
        if name.startswith(("text.pooler", "vision.post_ln")):
            continue  # not on the path of the fused token states
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert r.vision.patch.weight.grad.abs().sum() > 0
    assert r.heads["fusion"][0].parameters().__next__().grad.abs().sum() > 0


def test_reader_save_load(dirs, tmp_path):
    r = MultimodalReader.build(dirs / "text", dirs / "vision", n_fusion=1, n_heads=4,
                               labels=["no", "yes"])
    with torch.no_grad():
        for p in r.heads.parameters():
            p.normal_()
    r.eval().save(tmp_path / "reader")
    r2 = MultimodalReader.from_pretrained(tmp_path / "reader")
    ids, pixels = torch.randint(1, 90, (1, 12)), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = r(ids, pixels=pixels), r2(ids, pixels=pixels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert r2.config.labels == ["no", "yes"]


def test_reader_fusion_formula():
    """The reader's fusion layer (CoAttention) == the formula of docs/design.md in float64 (dense softmax, explicit lengths)."""
    torch.manual_seed(1)
    m = CoAttention(24, 3)
    ht, hv = torch.randn(2, 9, 24), torch.randn(2, 5, 24)
    lt, lv = torch.tensor([9, 4]), torch.tensor([5, 2])
    ft, fv = m(ht, hv, lt, lv)

    def ref(m, hq, hk, lq, lk, dtype):
        W = {n: (getattr(m, n).weight.to(dtype), getattr(m, n).bias.to(dtype))
             for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        lin = lambda x, n: x @ W[n][0].T + W[n][1]  # noqa: E731
        sp = lambda x: x.view(x.shape[0], x.shape[1], 3, 8).transpose(1, 2)  # noqa: E731
        q, k, v = sp(lin(hq.to(dtype), "q_proj")), sp(lin(hk.to(dtype), "k_proj")), \
            sp(lin(hk.to(dtype), "v_proj"))
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        mask = (torch.arange(hk.shape[1])[None] < lk[:, None])[:, None, None]
        o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        o = o.transpose(1, 2).reshape(hq.shape[0], hq.shape[1], -1)
        qm = (torch.arange(hq.shape[1])[None] < lq[:, None])[..., None]
        return hq.to(dtype) + lin(o * qm, "o_proj")

    for b, (L, Lo) in enumerate([(9, 5), (4, 2)]):
        assert_close("f_t", ft[b, :L], ref(m, ht, hv, lt, lv, torch.float64)[b, :L],
                     ref(m, ht, hv, lt, lv, torch.float32)[b, :L])
        assert_close("f_v", fv[b, :Lo], ref(m, hv, ht, lv, lt, torch.float64)[b, :Lo],
                     ref(m, hv, ht, lv, lt, torch.float32)[b, :Lo])
