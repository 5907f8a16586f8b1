"""The ``"mmcore"`` attention implementation for Hugging Face transformers (the supported
versions: requirements-hf.txt, ``mmcore.patch.versions``).

Two functions are registered:

* ``mmcore_mask`` with ``transformers.AttentionMaskInterface``: instead of a dense 4-D mask it
  returns the 2-D padding mask ``(B, kv_length)`` (bool, True = real token), sliced to the keys
  the layer will see, and tags it with a :class:`MaskSpec` (mask kind, HF window, query/key
  offsets, packed-sequence ids).  Patterns that are one key interval per query row
  (``or``/``and`` overlays of causal, sliding and image / prefix groups: PaliGemma, Gemma-3)
  are tagged with per-row key bounds instead (eager only: ``mmcore.patch.hf_bounds``).  Other
  patterns get HF's own dense boolean mask, and the attention function then takes the dense
  torch path for that call.  How patterns are recognised, eagerly and under
  ``torch.compile``: ``mmcore.patch.hf_masks``.
* ``mmcore_attention_forward`` with ``transformers.AttentionInterface`` (HF's signature):
  translates the spec into ``mmcore.ops.window_attention`` arguments.  GQA k/v are passed
  with their Hkv heads (no ``repeat_kv``); HF's ``softcap`` (Gemma-2) goes to the op's
  ``softcap``.  Right padding becomes ``seqlens``; left and holey padding are compacted per
  sample (``mmcore.patch.varlen``), except where compaction would move window positions
  (holes in a sliding-window layer; left padding with global tokens): there the padding is
  the op's ``key_mask`` on the keys as they are (window positions count key indices, as HF's
  masks do).  Packed sequences become a batch of segments; a dense 4-D mask a model built
  itself (mllama) is factored into key bounds + ``key_mask`` when it has that form (eager,
  ``hf_bounds.factor_dense``).  Attention dropout while training (``dropout > 0`` and
  ``module.training``: BERT-family fine-tuning) goes to the op's ``dropout_p`` (the same
  distribution as HF eager's ``F.dropout`` on the weights; the mask comes from the op's own
  seeded generator, so it differs from eager's draw).  What the op cannot express exactly
  (attention sinks, a forced backend that does not serve ``softcap`` / ``key_mask`` /
  ``dropout``, ...) is computed by a dense eager-equivalent torch path for that call: never
  a wrong answer.

Under ``torch.compile(fullgraph=True)`` both functions trace: the layout decisions are tensor
ops (sliding-window and global-token layers: ``key_mask`` always; others: compaction always),
and what eager code would check with a Python branch is enforced with ``torch._assert_async``
(packed sequences and unknown patterns take HF's dense mask).  Masks that generate() builds
before the compiled forward carry their offsets as tensors, so decoding steps do not
recompile.

HF window conventions, mapped exactly (docs/design.md): causal ``sliding_window=w`` (``kv > q - w``)
-> ``window=(w - 1, 0), causal=True``; bidirectional ``|q - kv| <= w`` -> ``window=(w, w)``.
Padded query rows (pad tokens) return 0 in causal / windowed layers, as with flash-attention;
HF eager returns an unspecified average for them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..nn.call_stats import CallStats
from ..ops import window_attention
from . import hf_bounds, varlen
from .hf_masks import MaskSpec, classify, classify_traced, expected

logger = logging.getLogger("mmcore.patch")

NAME = "mmcore"

# Per-module override attribute (set by mmcore.patch for LongContext): AttentionOverride
OVERRIDE_ATTR = "_mmcore_attention"
# Per-module counters (set by mmcore.patch, shared by the modules of one patch call)
STATS_ATTR = "_mmcore_stats"


@dataclasses.dataclass(frozen=True)
class AttentionOverride:
    """Per-module override (LongContext): a bidirectional window (left, right) and G globals."""
    window: tuple
    global_tokens: int = 0


# ------------------------------------------------------------------ stats (for tests / report)
Stats = CallStats  # attention calls: on the op / on the dense path; eager calls only
STATS = Stats()  # process-wide


def count(module, reason=None):
    """One attention call of `module`: served by the op (reason None) or by the dense path."""
    if _compiling():  # a counter in a traced graph is a guard on its value: a recompile per call
        return
    for st in (STATS, getattr(module, STATS_ATTR, None)):
        if st is None:
            continue
        if reason is None:
            st.op_calls += 1
        else:
            st.fallback(reason)


def _compiling():
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------ mask function
def _hf_sdpa_mask():
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask


def mmcore_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, local_size=None, use_vmap=False, device="cpu", **kwargs):
    """AttentionMaskInterface function: a tagged 2-D padding mask (or HF's dense bool mask
    for patterns that cannot be expressed exactly).

    The 2-D mask returned covers key columns [0, kv_offset + kv_length) (the attention function
    reads its last Sk columns): it is a valid 2-D padding mask itself, so when HF hands it back
    in (generate() builds the masks before the forward, which builds them again) the result is
    the same, with or without its tag (torch.compile's tracing drops attributes on ``.to()``)."""
    # a static cache hands its live length counter as the offset, and bumps it in place before
    # the attention runs: keep the value it has now
    prepared = hf_bounds.handed_back(attention_mask, batch_size, q_length, kv_length, q_offset,
                                     kv_offset)
    if prepared is not None:
        return prepared
    if isinstance(q_offset, torch.Tensor):
        q_offset = q_offset.detach().clone()
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function
        mask_function = causal_mask_function
    if isinstance(kv_offset, torch.Tensor):
        cls = None  # no transformers cache gives one today
    elif _compiling():
        cls = classify_traced(mask_function, local_size, use_vmap, attention_mask,
                              kwargs.get("config"), kwargs)
    else:
        cls = None if use_vmap else classify(mask_function, q_length, kv_length,
                                             _int(q_offset), kv_offset)
    if cls is None and not _compiling() and not isinstance(kv_offset, torch.Tensor):
        tagged = hf_bounds.mask_for(mask_function, batch_size, q_length, kv_length,
                                    _int(q_offset), kv_offset, attention_mask,
                                    device)  # per-row key bounds
        if tagged is not None:
            return tagged
    if cls is None:
        for k in ("allow_is_causal_skip", "allow_is_bidirectional_skip", "dtype", "config"):
            kwargs.pop(k, None)
        return _hf_sdpa_mask()(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                               q_offset=q_offset, kv_offset=kv_offset,
                               mask_function=mask_function, attention_mask=attention_mask,
                               allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                               use_vmap=use_vmap, device=device)
    pm = varlen.key_padding(attention_mask, batch_size, kv_offset + kv_length, device)
    pm._mmcore_spec = MaskSpec(cls[0], cls[1], _offset(q_offset), _offset(kv_offset), cls[2])
    return pm


def _int(x):
    return int(x) if isinstance(x, torch.Tensor) else x


def _offset(x):
    """A mask made eagerly (generate() builds the masks of a compiled decoding step before
    calling the compiled forward) carries its offsets as 0-dim int64 tensors: a Python int
    read under torch.compile is a guard on its value, i.e. one compile per decoding step.
    Inside a trace ints stay as they are (they come from the cache, which dynamo already
    guards or treats as dynamic).  A CPU tensor: reading it eagerly costs no device sync, and
    a 0-dim CPU tensor combines with tensors on any device."""
    if isinstance(x, torch.Tensor) or _compiling():
        return x
    return torch.tensor(x, dtype=torch.long)


# ------------------------------------------------------------------ attention function
def _window_args(kind, hf_window, override):
    """-> (causal, (left, right), G)."""
    if override is not None and kind == "bidirectional":
        return False, tuple(override.window), int(override.global_tokens)
    if kind == "causal":
        return True, ((hf_window - 1) if hf_window is not None else -1, 0), 0
    if hf_window is not None:
        return False, (hf_window, hf_window), 0
    return False, (-1, -1), 0


def _spec_of(attention_mask, module, is_causal, sliding_window, Sq, Sk):
    spec = getattr(attention_mask, "_mmcore_spec", None)
    if spec is not None:
        return spec
    # No tag (mask built elsewhere, or None): sdpa / flash-attention conventions.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    kind = "causal" if causal else "bidirectional"
    win = None
    if sliding_window is not None:
        # flash-attention convention used by HF: window_size = (w - 1, w - 1) / (w - 1, 0)
        win = int(sliding_window) if causal else int(sliding_window) - 1
    return MaskSpec(kind, win, Sk - Sq, 0)


def _dense_allowed(spec, override, pm, B, Sq, Sk, device):
    """(B, 1, Sq, Sk) bool mask with the exact semantics the spec/override stand for."""
    q = torch.arange(Sq, device=device)[:, None] + spec.q_offset
    kv = torch.arange(Sk, device=device)[None, :] + spec.kv_offset
    if override is not None and spec.kind == "bidirectional":
        left, right = override.window
        G = override.global_tokens
        m = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
        if left >= 0:
            m &= kv >= q - left
        if right >= 0:
            m &= kv <= q + right
        m |= (kv < G) | (q < G)
    else:
        m = expected(spec.kind, spec.window, q, kv)
    m = m[None, None].expand(B, 1, Sq, Sk)
    if pm is not None:
        m = m & pm[:, None, None, :Sk].bool()
    if spec.segments is not None:
        seg = spec.segments.to(device)
        m = m & (seg[:, None, :Sq, None] == seg[:, None, None, :Sk])
    return m


def _dense_attention(query, key, value, mask, scaling, dropout, softcap, training, keep=None):
    """Eager-equivalent attention (GQA by repeat) with an additive finfo.min mask.
    keep: a list that gets the attention weights (B, Hq, Sq, Sk), as eager returns them."""
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv:
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=w.dtype, device=w.device),
                               torch.finfo(w.dtype).min)
        w = w + mask[:, :, :, : key.shape[-2]].to(w.dtype)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and training:
        w = torch.nn.functional.dropout(w, p=dropout, training=True)
    if keep is not None:
        keep.append(w)
    return torch.matmul(w, value)


def _serves(backend, feature):
    """Does the attention's backend serve `feature` ("softcap", "key_mask", "dropout") of the
    op?  With
    "auto", a backend that declares it is always found (the torch reference declares all)."""
    from ..ops import registry
    backend = registry.requested(backend)
    if backend == "auto":
        return True
    return bool(getattr(registry.get("window_attention", backend), "supports_" + feature,
                        False))


# Attention dropout while training: under "auto" the op takes a dropout call whenever the
# backend auto picks for it serves dropout at full speed (OpImpl.dropout_full_speed: the C++ `cpu`
# kernels, on CPU tensors).  Measured (benchmarks/bench_window_attention.py --dropout, BERT-base
# shapes B = 8, H = 12, D = 64, fp32, forward + backward, 2 threads; benchmarks/RESULTS.md): the
# cpu backend with dropout_p = 0.1 takes about 1.04x its time without dropout and 1.1-2.6x less
# than the dense eager path (softmax, F.dropout, matmul) at S = 128 and 512, 12-16x less at
# N = 4096 with a +-256 window.  Where auto would
# land on the pure-PyTorch `torch` backend (a CPU build without mmcore._C) the old rule holds:
# its dropout takes 2-2.5x the dense eager path's time for equal work, so the op takes the call
# only when its rows see at most this share of the keys (a windowed layer doing >= 4x less
# work than dense).  The same rule holds for `triton` (CUDA tensors) until its dropout path is
# measured on a GPU.  A backend named by
# the user (mmcore.patch(backend="torch"), MMCORE_BACKEND) is always honoured.
DROPOUT_OP_MAX_SHARE = 0.25


def auto_dropout_backend(query, key=None):
    """The backend ``auto`` picks for a dropout window_attention call on tensors like query
    (B, Hq, Sq, D) (and key (B, Hkv, Sk, D)), with gradients; None when none serves it."""
    from ..ops import registry
    from ..ops.window_attention import problem
    p = problem(query, query if key is None else key, None, None, -1, -1, False, 0, True,
                   dropout_p=0.5)
    impls, _ = registry.plan("window_attention", p)
    return impls[0].backend if impls else None


def dropout_dense_reason(backend, keys_per_row, Sk, query=None, key=None):
    """-> the dense-path reason for a dropout-while-training call under "auto" whose rows see
    `keys_per_row` of `Sk` keys, or None when the op takes it.

    query / key: tensors of the call (device, dtype, head dim): when the backend auto picks
    for them declares dropout at full speed (OpImpl.dropout_full_speed: the C++ cpu kernels)
    the op always takes the call;
    without them (or on the torch backend) the DROPOUT_OP_MAX_SHARE rule decides."""
    from ..ops import registry
    if registry.requested(backend) != "auto":
        return None
    if query is not None:
        name = auto_dropout_backend(query, key)
        if name is not None and registry.get("window_attention", name).dropout_full_speed:
            return None
    if keys_per_row <= DROPOUT_OP_MAX_SHARE * Sk:
        return None
    return ("attention dropout while training (rows see most keys: the dense path is faster "
            "than the op's dropout on the backend serving this call, or not measured against it)")


WEIGHTS_REASON = "output_attentions=True needs the attention weights"  # as Longformer's


# Set by mmcore.patch on each module it switches: did the model's attention return the weights
# before (attn_implementation "eager")?  Only then does output_attentions=True get them.
EAGER_WEIGHTS_ATTR = "_mmcore_eager_weights"
_warned_no_weights = []


def weights_wanted(module, kwargs) -> bool:
    """Does this call have to return the attention weights?  ``output_attentions=True`` (given
    to the model's forward: transformers passes it down to the attention function, or set on
    the config) on a module whose implementation before mmcore.patch was "eager", which
    returns them (Gemma-2's default): the op never forms the weights, so such a call takes the
    dense path and returns them, (B, Hq, Sq, Sk).  Where mmcore replaces sdpa (or was chosen
    with attn_implementation="mmcore"), it does what sdpa does: the call stays on the op, the
    weights are None, with a warning once (docs/huggingface.md, "Attention weights")."""
    asked = bool(kwargs.get("output_attentions")) or bool(
        getattr(getattr(module, "config", None), "output_attentions", False))
    if not asked:
        return False
    if module.__dict__.get(EAGER_WEIGHTS_ATTR, False):
        return True
    if not _warned_no_weights:
        _warned_no_weights.append(True)
        logger.warning("mmcore attention does not return attention weights "
                     "(output_attentions=True), as sdpa, which it replaces here; patch a model "
                     "loaded with attn_implementation='eager' to get them")
    return False


def _static_reason(module, query, value, dropout, softcap, training, kwargs, backend):
    if weights_wanted(module, kwargs):
        return WEIGHTS_REASON
    if softcap is not None and not _serves(backend, "softcap"):
        return f"attention logit softcapping (backend {backend!r} does not serve softcap)"
    if dropout and training and not _serves(backend, "dropout"):
        return f"attention dropout while training (backend {backend!r} does not serve dropout)"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks (s_aux)"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim differs from query head dim"
    return None


def mmcore_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, sliding_window=None, softcap=None, is_causal=None,
                             **kwargs):
    """AttentionInterface function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) ->
    (out (B, Sq, Hq, D), None), or (out, weights (B, Hq, Sq, Sk)) from the dense path when the
    weights are requested (:func:`weights_wanted`)."""
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    if scaling is None:
        scaling = D ** -0.5
    training = bool(getattr(module, "training", False))
    override = getattr(module, OVERRIDE_ATTR, None)
    backend = getattr(module, "_mmcore_backend", None) or "auto"
    reason = _static_reason(module, query, value, dropout, softcap, training, kwargs, backend)
    keep = [] if reason == WEIGHTS_REASON else None  # the dense path's weights go here
    drop = float(dropout) if (dropout and training) else 0.0  # the op's dropout_p
    if drop and reason is None and (
            (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4) or
            hf_bounds.spec_of(attention_mask) is not None):
        # per-row intervals: not known cheap
        reason = dropout_dense_reason(backend, Sk, Sk, query, key)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        out = None if reason else hf_bounds.attend_dense(module, query, key, value,
                                                         attention_mask, scaling, softcap,
                                                         dropout_p=drop)
        count(module, None if out is not None else
              reason or "dense 4-D mask (pattern not expressible)")
        if out is None:
            out = _dense_attention(query, key, value, attention_mask, scaling, dropout, softcap,
                                   training, keep)
        return out.transpose(1, 2).contiguous(), (keep[-1] if keep else None)
    bspec = hf_bounds.spec_of(attention_mask)
    if bspec is not None:  # per-row key bounds (mask patterns of hf_bounds)
        out, reason = hf_bounds.attend_tagged(
            module, query, key, value, attention_mask, bspec, scaling, softcap, reason,
            lambda m: _dense_attention(query, key, value, m, scaling, dropout, softcap,
                                       training, keep), dropout_p=drop)
        count(module, reason)
        return out.transpose(1, 2).contiguous(), (keep[-1] if keep else None)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"mmcore attention: unsupported attention_mask type "
                        f"{type(attention_mask).__name__} (expected a 2-D tensor or None)")
    spec = _spec_of(attention_mask, module, is_causal, sliding_window, Sq, Sk)
    pm = attention_mask
    if pm is not None:
        if pm.dim() != 2:
            raise ValueError(f"mmcore attention: attention_mask must be 2-D, got {pm.dim()}-D")
        pm = pm[:, -Sk:] if pm.shape[-1] >= Sk else torch.nn.functional.pad(
            pm.bool(), (0, Sk - pm.shape[-1]))
        pm = pm.bool()
    causal, window, G = _window_args(spec.kind, spec.window, override)
    cap = None if softcap is None else float(softcap)

    def op(q, k, v, seqlens_q, seqlens_k, key_mask=None):
        return window_attention(q, k, v, window=window, causal=causal, global_tokens=G,
                                seqlens_q=seqlens_q, seqlens_k=seqlens_k, scale=float(scaling),
                                softcap=cap, key_mask=key_mask, dropout_p=drop,
                                backend=backend)

    out = None
    if drop and reason is None:
        keys = Sk if window[0] < 0 or (window[1] < 0 and not causal) else \
            window[0] + (0 if causal else window[1]) + 1 + G
        reason = dropout_dense_reason(backend, keys, Sk, query, key)
    if reason is None:
        out, reason = _attend(op, query, key, value, pm, spec, causal, window, G,
                              _serves(backend, "key_mask"))
    if reason is not None:
        count(module, reason)
        mask = _dense_allowed(spec, override, pm, B, Sq, Sk, query.device)
        out = _dense_attention(query, key, value, mask, scaling, dropout, softcap, training,
                               keep)
    else:
        count(module)
    return out.transpose(1, 2).contiguous(), (keep[-1] if keep else None)


def _attend(op, q, k, v, pm, spec, causal, window, G, masked_ok):
    """-> (out (B, Hq, Sq, D), None) from the op, or (None, reason) for the dense path.

    masked_ok: the backend serves key_mask.  Sliding-window (and global-token) layers whose
    padding the compaction cannot serve (holes; globals with left padding) then run the op
    on the uncompacted keys with the padding as key_mask; under torch.compile they always
    do (no data-dependent choice), eagerly only when the cheaper layouts do not apply."""
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    traced = _compiling()
    d = spec.q_offset - spec.kv_offset  # key column of query row 0 (int or 0-dim tensor)
    if not traced:
        d = _int(d)
    static_d = not isinstance(d, torch.Tensor)
    windowed = window not in ((-1, -1), (-1, 0))
    free = not causal and not windowed and G == 0  # plain bidirectional: alignment irrelevant
    if G > min(Sq, Sk):
        return None, "more global tokens than keys"
    if not free and not causal and not (static_d and d == 0 and Sq == Sk):
        return None, "bidirectional window with queries not aligned to the keys"
    if spec.segments is not None:
        if traced or pm is None or not bool(pm.all()) or not static_d or d != 0 or Sq != Sk:
            return None, "packed sequences with padding or an offset"
        return varlen.attend_segments(op, q, k, v, spec.segments), None
    no_pm = pm is None
    if no_pm:
        pm = torch.ones(B, Sk, dtype=torch.bool, device=q.device)
        if static_d and d == 0 and Sq == Sk:
            return op(q, k, v, None, None), None
    qvalid, kvalid = varlen.masks(pm, Sq, Sk, d, causal)
    need_run = windowed or G > 0
    if traced:
        if need_run and masked_ok:
            if static_d and not 0 <= d <= Sk - Sq:
                return None, "queries outside the keys"
            return _attend_key_mask(op, q, k, v, None if no_pm else pm, qvalid, d), None
        if need_run:
            torch._assert_async(varlen.compact_ok(kvalid, G > 0),
                                "mmcore attention under torch.compile: the padding mask has "
                                "holes (or, with global tokens, left padding) in a "
                                "sliding-window layer and the backend does not serve "
                                "key_mask; run this batch eagerly")
        return varlen.attend_compacted(op, q, k, v, qvalid, kvalid, not free), None
    if need_run and not bool(varlen.compact_ok(kvalid, G > 0)):
        if masked_ok and 0 <= d <= Sk - Sq:
            return _attend_key_mask(op, q, k, v, pm, qvalid, d), None
        return None, ("global tokens with left padding" if G > 0 and bool(
            varlen.compact_ok(kvalid, False)) else "holes in the padding of a sliding-window "
            "layer")
    if bool(varlen.is_prefix(kvalid)) and (free or bool(varlen.is_prefix(qvalid))):
        # right padding (or none): seqlens alone, no gather
        Lk = kvalid.sum(1)
        Lq = None if free else qvalid.sum(1)
        if Lq is not None and bool((Lq == Sq).all()) and bool((Lk == Sk).all()):
            return op(q, k, v, None, None), None
        if Lq is None and bool((Lk == Sk).all()):
            return op(q, k, v, None, None), None
        return op(q, k, v, Lq, Lk), None
    return varlen.attend_compacted(op, q, k, v, qvalid, kvalid, not free), None


def _attend_key_mask(op, q, k, v, key_mask, qvalid, d):
    """The op on the keys as they are, key_mask (B, Sk) bool (or None) hiding the padding:
    window positions count key indices, as HF's masks do, so holes and left padding are exact.
    Query row i is the token of key column d + i (0 <= d <= Sk - Sq; an int or a 0-dim
    tensor): seqlens_k = d + Sq puts it there (bottom-right alignment; the keys after the last
    query are never seen by a causal layer, and a bidirectional window has d = 0, Sq = Sk).
    Rows of padding tokens return 0, as on the compacted path."""
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    if isinstance(d, torch.Tensor):
        seqlens_k = torch.full((B,), Sq, dtype=torch.long, device=q.device) + d.to(torch.long)
        torch._assert_async((d >= 0) & (d <= Sk - Sq),
                            "mmcore attention: queries outside the keys (offsets)")
    elif d == Sk - Sq:
        seqlens_k = None
    else:
        seqlens_k = torch.full((B,), d + Sq, dtype=torch.long, device=q.device)
    out = op(q, k, v, None, seqlens_k, key_mask)
    return torch.where(qvalid[:, None, :, None], out, torch.zeros((), dtype=out.dtype,
                                                                  device=out.device))


_REGISTERED = False


def register():
    """Register "mmcore" with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent).  After this, ``from_pretrained(..., attn_implementation="mmcore")`` works."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .._optional import require
    from .versions import check
    require("transformers", feature='attn_implementation="mmcore"')
    check("transformers")
    from transformers import AttentionInterface
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, mmcore_attention_forward)
    AttentionMaskInterface.register(NAME, mmcore_mask)
    _REGISTERED = True
