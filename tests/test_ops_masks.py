"""softcap, key_bounds (bounds mode) and key_mask on every backend that declares them, against
the float64 oracle (tests/kit.py, the tolerance rule of docs/design.md), forward, lse and
gradients (where the backend has a CPU backward), with NaN poison in every hidden key.

The backends are read from the registry's declarations, so a backend that starts declaring a
feature is tested here from then on; the patterns are the ones Hugging Face models hand over
(prefix-LM, bidirectional image blocks in causal / sliding text, packed segments, text rows
over one image's tokens, holey and left padding in a sliding window)."""
import pytest
import torch

import mmcore
from kit import check_attention_case
from mmcore.ops import registry
from mmcore.ops.backends import _loaders


def _backends(op, feature):
    out = []
    for impl in registry.implementations(op):
        if getattr(impl, f"supports_{feature}") and "cpu" in impl.devices and \
                not impl.available():
            out.append(impl.backend)
    return out


def _grads(op, backend, **extra):
    """Whether the backend has a CPU backward for such a problem (flex has none there)."""
    impl = registry.get(op, backend)
    p = registry.Problem(op, "cpu", torch.float32, head_dim=16, needs_grad=True,
                         extra=dict(extra, Sq=8, Sk=8))
    return not impl.refuse(p)


def _case(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, **kw):
    c = dict(B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=dtype, noncontig=False, scale=None,
             window=None, causal=False, G=0, seqlens_q=None, seqlens_k=None, softcap=None,
             key_bounds=None, key_mask=None)
    c.update(kw)
    return c


def _rows(B, Sq):
    return torch.arange(Sq)[None].expand(B, Sq)


def _prefix_lm(B, S):
    """Prefix-LM (PaliGemma): the image + prompt prefix P_b is bidirectional, the rest causal."""
    i = _rows(B, S)
    P = torch.tensor([5, 11, 0][:B])[:, None]
    return torch.zeros_like(i), torch.maximum(i + 1, P)


def _image_blocks(B, S, w=None):
    """Gemma-3: causal (or sliding w) text with bidirectional image-token blocks [4, 9), [13, 20)."""
    i = _rows(B, S)
    lo = torch.zeros_like(i) if w is None else i - w + 1
    hi = i + 1
    for s, e in ((4, 9), (13, 20)):
        inside = (i >= s) & (i < e)
        lo = torch.where(inside, torch.minimum(lo, torch.full_like(lo, s)), lo)
        hi = torch.where(inside, torch.full_like(hi, e), hi)
    return lo, hi


def _packed(B, S):
    """Packed sequences: segments [0, 6), [6, 15), [15, S), causal inside each."""
    i = _rows(B, S)
    start = torch.where(i < 6, 0, torch.where(i < 15, 6, 15))
    return start, i + 1


def _mllama(B, Sq, T=3, P=4):
    """Text rows over image tiles: rows < 3 see no image, then image 0 (2 valid tiles of T),
    from row 10 image 1 (3 valid tiles); keys: 2 images x T tiles x P patches."""
    i = _rows(B, Sq)
    lo = torch.where(i < 10, 0, T * P)
    hi = torch.where(i < 10, 2 * P, T * P + 3 * P)
    hi = torch.where(i < 3, lo, hi)  # empty rows
    return lo, hi


PATTERNS = {
    "prefix_lm": lambda: _case(3, 4, 2, 24, 24, 16, key_bounds=_prefix_lm(3, 24)),
    "image_blocks_causal": lambda: _case(2, 2, 1, 24, 24, 32, key_bounds=_image_blocks(2, 24)),
    "image_blocks_sliding": lambda: _case(2, 2, 2, 24, 24, 16,
                                          key_bounds=_image_blocks(2, 24, w=3)),
    "packed": lambda: _case(2, 3, 1, 22, 22, 16, key_bounds=_packed(2, 22)),
    "mllama_rows": lambda: _case(2, 4, 2, 17, 24, 16, key_bounds=_mllama(2, 17),
                                 seqlens_q=torch.tensor([17, 12])),
    "out_of_range": lambda: _case(2, 2, 2, 9, 13, 16, key_bounds=(
        torch.tensor([[-5, 0, 3, 20, 2, 7, 12, -1, 0]] * 2),
        torch.tensor([[4, 99, 2, 30, 13, 7, 13, 0, 1]] * 2))),
    "bounds_key_mask": lambda: _case(2, 2, 1, 20, 20, 16, key_bounds=_prefix_lm(2, 20),
                                     key_mask=torch.rand(2, 20,
                                                         generator=torch.Generator().manual_seed(3))
                                     > 0.3),
}

WINDOW_KEY_MASK = {
    "holes_sliding": lambda: _case(2, 4, 2, 24, 24, 16, window=(4, 0), causal=True,
                                   key_mask=torch.tensor([[1] * 5 + [0] * 3 + [1] * 16,
                                                          [0, 1] * 12]).bool()),
    "left_padding_sliding": lambda: _case(3, 2, 2, 20, 20, 16, window=(5, 0), causal=True,
                                          key_mask=torch.arange(20)[None] >= torch.tensor(
                                              [[0], [7], [20]])),
    "bidirectional_window_globals": lambda: _case(2, 2, 1, 18, 18, 16, window=(3, 3), G=2,
                                                  key_mask=torch.tensor([[1] * 18,
                                                                         [1] * 12 + [0] * 6]
                                                                        ).bool()),
    "right_padding_and_mask": lambda: _case(2, 2, 2, 16, 16, 16, window=(6, 0), causal=True,
                                            seqlens_q=torch.tensor([16, 9]),
                                            seqlens_k=torch.tensor([16, 9]),
                                            key_mask=torch.tensor([[1, 0] * 8, [1] * 16]).bool()),
}


@pytest.mark.parametrize("backend", _backends("window_attention", "key_bounds"))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_key_bounds_patterns(backend, pattern):
    c = PATTERNS[pattern]()
    if c["key_mask"] is not None and backend not in _backends("window_attention", "key_mask"):
        pytest.fail(f"{backend} declares key_bounds but not key_mask")  # never silently skip
    grads = _grads("window_attention", backend, key_bounds=True,
                   key_mask=c["key_mask"] is not None)
    check_attention_case("window_attention", backend, c, grads=grads, seed=7)


@pytest.mark.parametrize("backend", _backends("window_attention", "key_mask"))
@pytest.mark.parametrize("pattern", sorted(WINDOW_KEY_MASK))
def test_key_mask_in_window_mode(backend, pattern):
    c = WINDOW_KEY_MASK[pattern]()
    grads = _grads("window_attention", backend, key_mask=True, window=c["window"],
                   causal=c["causal"])
    check_attention_case("window_attention", backend, c, grads=grads, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends("window_attention", "softcap"))
def test_softcap_window(backend, dtype):
    for n, c in enumerate([
            _case(2, 4, 2, 33, 33, 16, dtype=dtype, window=(7, 0), causal=True, softcap=2.0,
                  scale=1.5),
            _case(1, 2, 2, 17, 29, 32, dtype=dtype, window=(3, 5), G=3, softcap=0.5,
                  seqlens_k=torch.tensor([21])),
            _case(2, 2, 1, 20, 20, 16, dtype=dtype, softcap=30.0, key_bounds=_prefix_lm(2, 20)),
    ]):
        if c["key_bounds"] is not None and backend not in _backends("window_attention",
                                                                    "key_bounds"):
            continue  # a softcap backend without bounds: its softcap is tested by the others
        grads = _grads("window_attention", backend, softcap=True)
        check_attention_case("window_attention", backend, c, grads=grads, seed=n)


@pytest.mark.parametrize("backend", _backends("cross_attention", "softcap"))
def test_softcap_cross(backend):
    c = _case(2, 4, 2, 19, 50, 16, softcap=1.0, scale=2.0, seqlens_k=torch.tensor([50, 0]),
              seqlens_q=torch.tensor([19, 4]))
    check_attention_case("cross_attention", backend, c,
                         grads=_grads("cross_attention", backend, softcap=True), seed=5)


def test_softcap_changes_the_answer():
    """The oracle's cap is live at these logits (a test that can fail)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) * 3 for _ in range(3))
    a = mmcore.window_attention(q, k, v, backend="torch")
    b = mmcore.window_attention(q, k, v, softcap=1.0, backend="torch")
    assert (a - b).abs().max() > 1e-2


def test_bounds_equal_the_window_they_express():
    """causal sliding window w as bounds (i - w + 1, i + 1) == window=(w - 1, 0), causal."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 30, 16, generator=g) for _ in range(3))
    i = _rows(2, 30)
    for backend in _backends("window_attention", "key_bounds"):
        a = mmcore.window_attention(q, k, v, key_bounds=(i - 3, i + 1), backend=backend)
        b = mmcore.window_attention(q, k, v, window=(3, 0), causal=True, backend="torch")
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=backend)


def test_key_bounds_under_compile():
    """The custom op takes the new optional tensors under torch.compile(fullgraph=True)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=g) for _ in range(3))
    lo, hi = _prefix_lm(2, 12)
    km = torch.ones(2, 12, dtype=torch.bool)
    km[1, 3] = False

    def f(q, k, v, lo, hi, km):
        return mmcore.window_attention(q, k, v, key_bounds=(lo, hi), key_mask=km, softcap=5.0,
                                       backend="torch")

    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, lo, hi, km)
    torch.testing.assert_close(got, f(q, k, v, lo, hi, km), atol=0, rtol=0)


def test_opcheck_window_custom_op_with_features():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    lo, hi = torch.zeros(1, 6, dtype=torch.int32), torch.full((1, 6), 4, dtype=torch.int32)
    km = torch.tensor([[True, False, True, True, True, True]])
    torch.library.opcheck(torch.ops.mmcore.window_attention_fwd.default,
                          (q, k, v, None, None, -1, -1, False, 0, 0.3, "torch", 2.0, lo, hi, km),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ bad input
def _qkv():
    return (torch.randn(2, 2, 5, 8) for _ in range(3))


@pytest.mark.parametrize("kw, exc, words", [
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(key_bounds=torch.zeros(2, 5)), TypeError, "key_bounds"),
    (dict(key_bounds=(torch.zeros(2, 5, dtype=torch.int32),)), TypeError, "key_bounds"),
    (dict(key_bounds=(torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32))),
     ValueError, "key_bounds[0]"),
    (dict(key_bounds=(torch.zeros(2, 5), torch.ones(2, 5))), TypeError, "key_bounds[0]"),
    (dict(key_bounds=(torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.int32)),
          causal=True), ValueError, "key_bounds replaces"),
    (dict(key_bounds=(torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.int32)),
          window=(2, 0)), ValueError, "key_bounds replaces"),
    (dict(key_mask=torch.ones(2, 5)), TypeError, "key_mask"),
    (dict(key_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_mask"),
    (dict(key_mask=torch.ones(5, dtype=torch.bool)), ValueError, "key_mask"),
])
def test_bad_input_names_the_argument(kw, exc, words):
    q, k, v = _qkv()
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        mmcore.window_attention(q, k, v, **kw)


def test_backend_without_the_feature_is_refused_by_name():
    q, k, v = _qkv()
    with pytest.raises(registry.BackendError, match="no softcap"):
        mmcore.window_attention(q, k, v, softcap=2.0, backend="sdpa")
    with pytest.raises(registry.BackendError, match="no key_mask"):
        mmcore.window_attention(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool),
                                backend="sdpa")
    with pytest.raises(registry.BackendError, match="no softcap"):
        mmcore.cross_attention(q, k, v, softcap=2.0, backend="sdpa")


def test_auto_serves_every_feature_on_the_cpu():
    q, k, v = _qkv()
    lo, hi = torch.zeros(2, 5, dtype=torch.int64), torch.full((2, 5), 3)
    out = mmcore.window_attention(q, k, v, softcap=3.0, key_bounds=(lo, hi),
                                  key_mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_bench_masks_cases_agree_with_their_baselines():
    """benchmarks/bench_masks.py: each mmcore call equals the baseline it is timed against
    (small S; the benchmark itself checks again at its warm-up call)."""
    from mmcore.benchmarks import bench_masks as bm

    S = 96
    g = torch.Generator().manual_seed(0)
    q = torch.randn(bm.B, bm.HQ, S, bm.D, generator=g)
    k, v = (torch.randn(bm.B, bm.HKV, S, bm.D, generator=g) for _ in range(2))
    cases = bm._cases(S, "cpu", W=8, IMG=12)  # the patterns at a small scale
    assert len(cases) == 4
    for name, _, base, ours, _ in cases:
        torch.testing.assert_close(ours(q, k, v), base(q, k, v), atol=2e-5, rtol=0, msg=name)
