"""TextEncoder == transformers.BertModel / RobertaModel on the same weights; long-document mode."""
import os

import pytest
import torch
from kit import assert_close

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmcore.models import TextEncoder, default_text_model  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    d = default_text_model()
    ref = transformers.BertModel.from_pretrained(d).eval()
    ref64 = transformers.BertModel.from_pretrained(d, dtype=torch.float64).eval()
    return TextEncoder.from_pretrained(d), ref, ref64


def _inputs(B_lens, S, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (len(B_lens), S), generator=g)
    lens = torch.tensor(B_lens)
    am = (torch.arange(S)[None] < lens[:, None]).long()
    return ids, lens, am


def _check_padded(name, h, ref, ref64, lens):
    for b, L in enumerate(lens.tolist()):
        assert_close(f"{name}[{b}]", h[b, :L], ref64[b, :L], ref[b, :L])


def test_minilm_equals_bertmodel(minilm):
    enc, ref, ref64 = minilm
    ids, lens, am = _inputs([512, 137], 512, 30000, 0)
    with torch.no_grad():
        h = enc(ids, lens)
        r = ref(input_ids=ids, attention_mask=am)
        r64 = ref64(input_ids=ids, attention_mask=am)
    _check_padded("last_hidden_state", h, r.last_hidden_state, r64.last_hidden_state, lens)
    assert_close("pooler_output", enc.pool(h), r64.pooler_output, r.pooler_output)


def test_minilm_short_and_single(minilm):
    enc, ref, ref64 = minilm
    ids, lens, am = _inputs([1], 1, 30000, 1)
    with torch.no_grad():
        assert_close("S=1", enc(ids), ref64(input_ids=ids).last_hidden_state,
                     ref(input_ids=ids).last_hidden_state)


def test_long_mode_window_ge_n_equals_full(minilm):
    """window >= N (plus a global CLS) is full attention: same as BertModel."""
    enc, ref, ref64 = minilm
    ids, lens, am = _inputs([300, 211], 300, 30000, 2)
    with torch.no_grad():
        h = enc(ids, lens, window=(300, 300), global_tokens=1)
        hl = enc.encode_long(ids[:1], window=(300, 300), global_tokens=1, chunk=128)
        r = ref(input_ids=ids, attention_mask=am).last_hidden_state
        r64 = ref64(input_ids=ids, attention_mask=am).last_hidden_state
    _check_padded("window>=N", h, r, r64, lens)
    assert_close("encode_long window>=N", hl, r64[0], r[0])


def test_encode_long_equals_forward_past_the_table(minilm):
    """Chunked inference == the plain windowed forward, beyond 512 (wrapped positions)."""
    enc, _, _ = minilm
    ids, _, _ = _inputs([560], 560, 30000, 3)
    with torch.no_grad():
        a = enc(ids, window=(32, 32), global_tokens=2)[0]
        b = enc.encode_long(ids, window=(32, 32), global_tokens=2, chunk=96)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    pid = enc.position_ids(1100, "cpu")
    assert pid[511] == 511 and pid[512] == 0 and pid[1099] == 1099 - 1024


def test_roberta_equals_robertamodel(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=80,
                                     max_position_embeddings=70, type_vocab_size=1)
    m = transformers.RobertaModel(cfg).eval()
    m.save_pretrained(tmp_path, safe_serialization=True)
    enc = TextEncoder.from_pretrained(tmp_path)
    m64 = transformers.RobertaModel(cfg).double().eval()
    m64.load_state_dict(m.state_dict())
    ids = torch.randint(3, 120, (2, 68))
    lens = torch.tensor([68, 31])
    am = (torch.arange(68)[None] < lens[:, None]).long()
    ids[1, 31:] = cfg.pad_token_id  # RoBERTa derives positions from the padding
    with torch.no_grad():
        h = enc(ids, lens)
        r = m(input_ids=ids, attention_mask=am).last_hidden_state
        r64 = m64(input_ids=ids, attention_mask=am).last_hidden_state
    _check_padded("roberta", h, r, r64, lens)


def test_text_encoder_fwd_bwd_finite(minilm):
    enc, _, _ = minilm
    ids, lens, _ = _inputs([40, 17], 40, 30000, 4)
    h = enc(ids, lens, window=(8, 8), global_tokens=1)
    h[0].sum().backward()
    g = enc.layers[0].attn.q.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    enc.zero_grad(set_to_none=True)
