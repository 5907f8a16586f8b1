"""mmcore.patch.hf_bounds: HF mask functions and dense 4-D masks as per-row key intervals
(bounds mode) + key_mask, checked against the dense mask HF itself builds (sdpa_mask) or the
mask given -- pure tensor logic, no attention op."""
import pytest
import torch

from mmcore.patch import hf_bounds as hb

mu = pytest.importorskip("transformers.masking_utils")


def _tti(B, S, blocks, seed):
    """token_type_ids (B, S): 1 on image blocks; blocks[b] = list of (start, end)."""
    t = torch.zeros(B, S, dtype=torch.long)
    for b, bl in enumerate(blocks):
        for s, e in bl:
            t[b, s:e] = 1
    return t


def _pad(B, S, kind):
    am = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        n = [0, 3, 5][b % 3]
        if n and kind == "left":
            am[b, :n] = 0
        elif n and kind == "right":
            am[b, S - n:] = 0
    return am


def _gemma3_ids(tti):
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
    return get_block_sequence_ids_for_mask(tti)


def _check(fn, am, B, Sq, Sk, q_offset=0, kv_offset=0):
    """from_mask_function's bounds + padding == HF's sdpa_mask on every valid query row."""
    got = hb.from_mask_function(fn, B, Sq, Sk, q_offset, kv_offset, am, "cpu")
    assert got is not None
    lo, hi = got
    assert lo.dtype == hi.dtype == torch.int32 and lo.shape == hi.shape == (B, Sq)
    ref = mu.sdpa_mask(batch_size=B, q_length=Sq, kv_length=Sk, q_offset=q_offset,
                       kv_offset=kv_offset, mask_function=fn, attention_mask=am.bool(),
                       allow_is_causal_skip=False)
    km = am.bool()[:, kv_offset:kv_offset + Sk]
    mine = hb.dense_of(lo, hi, km, Sk)
    qvalid = am.bool()[:, q_offset:q_offset + Sq]
    assert torch.equal(mine[:, 0][qvalid], ref[:, 0][qvalid])
    assert not bool(mine[:, 0][~qvalid].any())  # padded query rows: empty
    return lo, hi


BLOCKS = [[(2, 6), (9, 12)], [(0, 4)], [(5, 9), (9, 9), (14, 17)]]


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_gemma3_image_blocks_full_and_sliding(padding):
    B, S = 3, 19
    am = _pad(B, S, padding)
    tti = _tti(B, S, BLOCKS, 0) * am  # padding is text
    ids = _gemma3_ids(tti)
    full = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    lo, hi = _check(full, am, B, S, S)
    # an image row sees its whole block: row 2 of sample 0 (block [2, 6)) -> keys [0, 6)
    if padding == "none":
        assert (lo[0, 2].item(), hi[0, 2].item()) == (0, 6)
    for w in (3, 5):
        sliding = mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
                               mu.sliding_window_overlay(w))
        _check(sliding, am, B, S, S)


def test_paligemma_prefix_lm_with_padding():
    """PaliGemma: block id 0 on the prefix (image + prompt, and on padding), -1 on the suffix:
    the prefix is bidirectional, the suffix causal; group 0 is not contiguous when the padding
    is at the end, but its valid keys are."""
    B, S = 3, 17
    for padding in ("left", "right", "none"):
        am = _pad(B, S, padding)
        tti = torch.ones(B, S, dtype=torch.long)
        for b, p in enumerate((6, 9, 4)):
            valid = torch.nonzero(am[b]).flatten()
            tti[b, valid[:p]] = 0
        tti[am == 0] = 0  # the processor gives padding type 0
        ids = torch.where(tti == 0, 0, -1)
        fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
        lo, hi = _check(fn, am, B, S, S)


def test_offsets_chunked_prefill_and_decode():
    """A second chunk (q_offset = kv_offset + 7 keys already cached) and a decode step."""
    B, S = 2, 20
    am = _pad(B, S, "left")[:2]
    ids = _gemma3_ids(_tti(B, S, [[(3, 9)], [(6, 8), (10, 15)]], 0) * am)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    _check(fn, am, B, 13, 20, q_offset=7)
    _check(fn, am, B, 1, 20, q_offset=19)
    sl = mu.and_masks(fn, mu.sliding_window_overlay(4))
    _check(sl, am, B, 5, 12, q_offset=15, kv_offset=8)


def test_other_interval_leaves():
    B, S = 2, 15
    am = _pad(B, S, "left")[:2]
    for fn in (mu.sliding_window_bidirectional_mask_function(3),
               mu.sliding_window_causal_mask_function(4),
               mu.chunked_causal_mask_function(4, torch.tensor([0, 3])),
               mu.bidirectional_mask_function):
        _check(fn, am, B, S, S)


def test_not_claimed():
    """Patterns that are not one interval per row (modulo padding) or not known: None."""
    B, S = 1, 12
    am = torch.ones(B, S, dtype=torch.long)
    ids = torch.full((B, S), -1)
    ids[0, [2, 3, 7]] = 0  # group 0 has a text key (4..6) inside its span
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    assert hb.from_mask_function(fn, B, S, S, 0, 0, am, "cpu") is None
    # the same group with the keys between them padding: an interval modulo padding
    am2 = am.clone()
    am2[0, 4:7] = 0
    _check(fn, am2, B, S, S)
    # a union with a gap: causal or a window around q + 6
    gap = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == q + 6)
    assert hb.from_mask_function(gap, B, S, S, 0, 0, am, "cpu") is None
    assert hb.from_mask_function(lambda b, h, q, kv: kv <= q, B, S, S, 0, 0, am, "cpu") is None
    pk = mu.and_masks(mu.causal_mask_function,
                      mu.packed_sequence_mask_function(torch.zeros(B, S, dtype=torch.long)))
    assert hb.from_mask_function(pk, B, S, S, 0, 0, am, "cpu") is None


def test_probe_catches_a_misread_leaf(monkeypatch):
    """A leaf read as the wrong pattern (here: a strict-causal function registered as
    causal) is refused by the probe on the mask function itself."""
    def strict(b, h, q, kv):
        return kv < q
    codes = dict(hb._codes())
    codes[strict.__code__] = "causal"
    monkeypatch.setattr(hb, "_CODES", codes)
    am = torch.ones(2, 8, dtype=torch.long)
    assert hb.from_mask_function(strict, 2, 8, 8, 0, 0, am, "cpu") is None
    # a bool window is not an int window: not read at all
    fn = mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(True))
    assert hb.from_mask_function(fn, 2, 8, 8, 0, 0, am, "cpu") is None


# ------------------------------------------------------------------ dense 4-D masks
def _additive(allowed, dtype=torch.float32):
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed,
                                                               torch.finfo(dtype).min)


def _mllama_cross(B, S, images, tiles, T, P, no_image_rows):
    """mllama's cross-attention mask (additive, via HF's own _prepare_cross_attention_mask):
    images[b] = [(first text row, tiles of that image)]."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    cam = torch.zeros(B, S, len(images[0]) if images[0] else 1, T, dtype=torch.long)
    for b, imgs in enumerate(images):
        for m, (start, nt) in enumerate(imgs):
            cam[b, start:, m, :nt] = 1
    mask, full_row = _prepare_cross_attention_mask(cam, P, torch.float32)
    return mask


def test_factor_mllama_cross_attention_mask():
    B, S, T, P = 3, 9, 4, 3
    images = [[(2, 2), (5, 4)], [(0, 1), (0, 3)], [(7, 4), (8, 2)]]
    mask = _mllama_cross(B, S, images, None, T, P, None)
    Sk = mask.shape[-1]
    f = hb.factor_dense(mask, B, S, Sk)
    assert f is not None and f.key_mask is not None and f.full is not None
    # rows before the first image see every key: served by the second call
    assert f.full[0, :2].all() and not f.full[0, 2:].any() and not f.full[1].any()
    mine = hb.dense_of(f.lo, f.hi, f.key_mask, Sk, f.full)
    assert torch.equal(mine, (mask == 0).expand(B, 1, S, Sk))


def test_factor_mllama_vision_mask():
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask
    arm = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    mask = _prepare_aspect_ratio_attention_mask(arm, num_patches=5, target_length=8,
                                                dtype=torch.float32)
    B, _, S, Sk = mask.shape
    f = hb.factor_dense(mask, B, S, Sk)
    assert f is not None
    assert torch.equal(hb.dense_of(f.lo, f.hi, f.key_mask, Sk, f.full), mask == 0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_factor_round_trip_random(dtype):
    g = torch.Generator().manual_seed(3)
    B, Sq, Sk = 4, 13, 17
    lo = torch.randint(0, Sk, (B, Sq), generator=g)
    hi = (lo + torch.randint(1, 8, (B, Sq), generator=g)).clamp(max=Sk)
    km = torch.rand(B, Sk, generator=g) > 0.25
    km.scatter_(1, lo, True)  # every row sees a key (its first)
    allowed = hb.dense_of(lo, hi, km, Sk)
    allowed[:, :, 3] = False  # a fully masked row
    mask = allowed if dtype == torch.bool else _additive(allowed, dtype)
    f = hb.factor_dense(mask.expand(B, 2, Sq, Sk), B, Sq, Sk)
    assert f is not None
    assert torch.equal(hb.dense_of(f.lo, f.hi, f.key_mask, Sk, f.full), allowed)
    assert (f.average is not None) == (dtype != torch.bool)  # row 3: additive -> mean of v


def test_factor_refuses():
    B, S = 2, 8
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(B, 1, S, S).clone()
    ok = hb.factor_dense(causal, B, S, S)
    assert ok is not None and ok.key_mask is None and ok.full is None
    holes = causal.clone()
    holes[0, 0, 5, 2] = False  # key 2 hidden from row 5 but seen by rows 2..4, 6, 7
    assert hb.factor_dense(holes, B, S, S) is None
    heads = causal.expand(B, 2, S, S).clone()
    heads[1, 1, 7, 0] = False  # heads differ
    assert hb.factor_dense(heads, B, S, S) is None
    add = _additive(causal)
    add[0, 0, 4, 1] = -3.0  # a bias, not a mask
    assert hb.factor_dense(add, B, S, S) is None
    add = _additive(causal)
    add[0, 0, 4, :] = torch.finfo(torch.float32).min  # fully masked additive row: HF averages
    f = hb.factor_dense(add, B, S, S)
    assert f.average is not None and f.average[0, 4] and f.average.sum() == 1
    assert f.lo[0, 4] == f.hi[0, 4]
    assert hb.factor_dense(causal.long(), B, S, S) is None


@pytest.mark.parametrize("seed", range(6))
def test_random_image_layouts_match_sdpa_mask(seed):
    """Random Gemma-3 image blocks, paddings, windows and chunk offsets: bounds + padding ==
    HF's own dense mask on every valid query row."""
    g = torch.Generator().manual_seed(seed)
    B, S = 3, int(torch.randint(8, 40, (1,), generator=g))
    am = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(0, S // 3, (1,), generator=g))
        if n and b % 2:
            am[b, :n] = 0
        elif n:
            am[b, S - n:] = 0
    tti = (torch.rand(B, S, generator=g) < 0.4).long() * am
    ids = _gemma3_ids(tti)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    w = int(torch.randint(1, 9, (1,), generator=g))
    q0 = int(torch.randint(0, S, (1,), generator=g))  # a later chunk of the same sequence
    for f in (fn, mu.and_masks(fn, mu.sliding_window_overlay(w))):
        _check(f, am, B, S, S)
        _check(f, am, B, S - q0, S, q_offset=q0)


def test_handed_back_mask_is_reused_or_refused():
    am = torch.ones(2, 10, dtype=torch.long)
    ids = torch.full((2, 10), -1)
    ids[:, 2:6] = 0
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    pm = hb.mask_for(fn, 2, 10, 10, 0, 0, am, "cpu")
    assert hb.spec_of(pm) is not None and hb.spec_of(am) is None
    assert hb.handed_back(pm, 2, 10, 10, 0, 0) is pm  # HF builds the masks again: reused
    assert hb.handed_back(am, 2, 10, 10, 0, 0) is None
    with pytest.raises(ValueError, match="handed back"):
        hb.handed_back(pm, 2, 4, 10, 6, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_dense_equals_the_dense_path(dtype):
    """The op calls (bounds + key_mask, the all-key rows, the averaged rows of an empty image
    slot) vs HF's eager computation with the additive mask, within the tolerance rule."""
    from kit import assert_close
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask
    from mmcore.patch import hf_interface as hfi
    arm = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # the last: empty slot
    mask = _prepare_aspect_ratio_attention_mask(arm, num_patches=5, target_length=8,
                                                dtype=torch.float32)
    B, _, S, _ = mask.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 4, S, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    out = hb.attend_dense(None, q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype), 0.25)
    f = hb.factor_dense(mask, B, S, S)
    assert out is not None and f.full is not None and f.average is not None
    ref = hfi._dense_attention(q.double(), k.double(), v.double(), mask.double(), 0.25, 0,
                               None, False)
    base = hfi._dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype), 0.25,
                                0, None, False)
    assert_close(f"attend_dense.{dtype}", out, ref, base)


def test_tagged_mask_inside_a_compiled_forward():
    """generate() builds the masks eagerly before a compiled decoding step: a mask tagged with
    bounds reaches the traced attention function, which must run the bounds there."""
    from mmcore.patch import hf_interface as hfi
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    ids = torch.full((2, 12), -1)
    ids[:, 4:8] = 0
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    pm = hb.mask_for(fn, 2, 12, 12, 0, 0, am, "cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=g)
    k, v = (torch.randn(2, 2, 12, 16, generator=g) for _ in range(2))
    mod = torch.nn.Module()
    want = hfi.mmcore_attention_forward(mod, q, k, v, pm, scaling=0.25)[0]
    torch._dynamo.reset()
    f = torch.compile(hfi.mmcore_attention_forward, fullgraph=True, backend="aot_eager")
    got = f(mod, q, k, v, pm, scaling=0.25)[0]
    dense = hb.dense_of(hb.spec_of(pm).lo, hb.spec_of(pm).hi, pm.bool(), 12)
    ref = hfi._dense_attention(q.double(), k.double(), v.double(), dense.double().log(),
                               0.25, 0, None, False).transpose(1, 2)
    base = hfi._dense_attention(q, k, v, dense, 0.25, 0, None, False).transpose(1, 2)
    valid = am.bool()
    from kit import assert_close
    assert_close("compiled bounds", got[valid], ref[valid], base[valid])
    assert_close("eager bounds", want[valid], ref[valid], base[valid])
