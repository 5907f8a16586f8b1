"""The ``"mmcore"`` attention implementation for Hugging Face transformers (5.17 .. 5.23).

Two functions are registered:

* ``mmcore_mask`` with ``transformers.AttentionMaskInterface``: instead of a dense 4-D mask it
  returns the 2-D padding mask ``(B, kv_length)`` (bool, True = real token), sliced to the keys
  the layer will see, and tags it with a :class:`MaskSpec` (mask kind, HF window, query/key
  offsets).  Mask patterns it cannot express exactly (``or``/``and`` overlays, packed sequences,
  chunked attention, anything unknown) get HF's own dense boolean mask, and the attention
  function then takes the dense torch path for that call.
* ``mmcore_attention_forward`` with ``transformers.AttentionInterface`` (HF's signature):
  translates the spec into ``mmcore.ops.window_attention`` arguments.  GQA k/v are passed
  with their Hkv heads (no ``repeat_kv``).  Right padding becomes ``seqlens``; left padding
  (generation) is turned into right padding by a per-sample shift (a gather) of q/k/v and the
  output is shifted back.  A layout the op cannot express exactly (non-contiguous padding,
  softcapping, attention dropout while training, attention sinks, ...) is computed by a dense
  eager-equivalent torch path for that call: never a wrong answer.

HF window conventions, mapped exactly (DESIGN.md): causal ``sliding_window=w`` (``kv > q - w``)
-> ``window=(w - 1, 0), causal=True``; bidirectional ``|q - kv| <= w`` -> ``window=(w, w)``.
Padded query rows (pad tokens) return 0, as with flash-attention; HF eager returns an
unspecified average for them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..ops import window_attention

logger = logging.getLogger("mmcore.patch")

NAME = "mmcore"

# Per-module override attribute (set by mmcore.patch for LongContext): MaskOverride
OVERRIDE_ATTR = "_mmcore_attention"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What the HF mask creator asked for, in absolute positions.

    kind: "causal" or "bidirectional"; window: HF's sliding window (int) or None;
    q_offset/kv_offset: absolute position of query row 0 / key column 0."""
    kind: str
    window: Optional[int]
    q_offset: int
    kv_offset: int


@dataclasses.dataclass(frozen=True)
class AttentionOverride:
    """Per-module override (LongContext): a bidirectional window (left, right) and G globals."""
    window: tuple
    global_tokens: int = 0


# ------------------------------------------------------------------ stats (for tests / report)
class _Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.op_calls = 0
        self.fallback_calls = 0
        self.fallback_reasons: dict = {}

    def fallback(self, reason):
        self.fallback_calls += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1


STATS = _Stats()


# ------------------------------------------------------------------ mask function
def _closure_vars(fn):
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    cells = getattr(fn, "__closure__", None) or ()
    out = {}
    for n, c in zip(names, cells):
        try:
            out[n] = c.cell_contents
        except ValueError:
            pass
    return out


def _leaves(fn, depth=0):
    """Flatten HF's ``and_masks`` closures into their leaf mask functions (None if unknown)."""
    if depth > 8:
        return None
    qn = getattr(fn, "__qualname__", "")
    if qn.startswith("and_masks.") or qn.endswith("and_mask"):
        subs = _closure_vars(fn).get("mask_functions")
        if not isinstance(subs, (tuple, list)):
            return None
        out = []
        for s in subs:
            leaves = _leaves(s, depth + 1)
            if leaves is None:
                return None
            out.extend(leaves)
        return out
    return [fn]


def _classify(mask_function):
    """-> (kind, window) for the mask patterns mmcore expresses exactly, else None."""
    leaves = _leaves(mask_function)
    if not leaves:
        return None
    kind = None
    window = None
    for f in leaves:
        qn = getattr(f, "__qualname__", "")
        if qn == "causal_mask_function":
            k = "causal"
        elif qn == "bidirectional_mask_function":
            k = "bidirectional"
        elif qn.startswith("sliding_window_overlay."):
            k, w = "causal", _closure_vars(f).get("sliding_window")
        elif qn.startswith("sliding_window_bidirectional_overlay."):
            k, w = "bidirectional", _closure_vars(f).get("sliding_window")
        else:
            return None
        if qn.startswith("sliding_window"):
            if not isinstance(w, int) or isinstance(w, bool) or w < 0 or window is not None:
                return None
            window = w
            if kind is not None and kind != k:
                return None
            kind = k
        else:
            if kind is not None and kind != k:
                return None
            kind = k
    if kind is None:
        return None
    if not _probe(mask_function, kind, window):
        return None
    return kind, window


def _expected(kind, window, q, kv):
    if kind == "causal":
        m = kv <= q
        if window is not None:
            m = m & (kv > q - window)
    else:
        m = torch.ones_like(kv <= q)
        if window is not None:
            m = m & ((q - kv).abs() <= window)
    return m


def _probe(mask_function, kind, window):
    """Check the classification on a few rows around the window edges (cheap)."""
    w = 4 if window is None else window
    n = 2 * w + 6
    q = torch.tensor([0, 1, w - 1, w, w + 1, 2 * w + 3]).clamp(min=0)[:, None]
    kv = torch.arange(n)[None, :]
    b = torch.zeros(1, 1, dtype=torch.long)
    h = torch.zeros(1, 1, dtype=torch.long)
    try:
        got = mask_function(b, h, q, kv)
        got = torch.as_tensor(got).expand(q.shape[0], n)
    except Exception:  # noqa: BLE001 - anything odd: not ours
        return False
    return bool(torch.equal(got.bool(), _expected(kind, window, q, kv)))


def _hf_sdpa_mask():
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask


def mmcore_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, local_size=None, use_vmap=False, device="cpu", **kwargs):
    """AttentionMaskInterface function: a tagged 2-D padding mask (or HF's dense bool mask
    for patterns that cannot be expressed exactly)."""
    if getattr(attention_mask, "_mmcore_spec", None) is not None:
        # one of our own masks handed back in (generate() prepares the mask before the
        # forward, which builds it again): start from the 2-D mask it was made from
        attention_mask = attention_mask._mmcore_source
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function
        mask_function = causal_mask_function
    cls = None if use_vmap else _classify(mask_function)
    if cls is None:
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        kwargs.pop("dtype", None)
        kwargs.pop("config", None)
        return _hf_sdpa_mask()(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                               q_offset=q_offset, kv_offset=kv_offset,
                               mask_function=mask_function, attention_mask=attention_mask,
                               allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                               use_vmap=use_vmap, device=device)
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    if attention_mask is None:
        pm = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        am = attention_mask.to(device=device, dtype=torch.bool)
        need = kv_offset + kv_length
        if am.shape[-1] < need:
            am = torch.nn.functional.pad(am, (0, need - am.shape[-1]))
        pm = am[:, kv_offset:kv_offset + kv_length].contiguous()
    pm._mmcore_spec = MaskSpec(cls[0], cls[1], q_offset, kv_offset)
    pm._mmcore_source = attention_mask
    return pm


# ------------------------------------------------------------------ attention function
@dataclasses.dataclass
class _Plan:
    ok: bool
    reason: str = ""
    seqlens_q: Optional[torch.Tensor] = None
    seqlens_k: Optional[torch.Tensor] = None
    shift_k: Optional[torch.Tensor] = None  # (B,) start of the valid keys, or None
    shift_q: Optional[torch.Tensor] = None  # (B,) start of the valid queries, or None
    q_end: Optional[torch.Tensor] = None


def _plan(pm, B, Sq, Sk, d, causal, windowed, G):
    """Express the padding layout of a (B, Sk) key mask with window_attention arguments.

    d = q_offset - kv_offset: query row i is the token of key column d + i."""
    dev = pm.device if pm is not None else None
    if pm is None or bool(pm.all()):
        s = torch.zeros(B, dtype=torch.long, device=dev)
        e = torch.full((B,), Sk, dtype=torch.long, device=dev)
        full = True
    else:
        pos = torch.arange(Sk, device=pm.device)
        n = pm.sum(1)
        s = torch.where(n > 0, pm.to(torch.int8).argmax(1), torch.zeros_like(n))
        e = s + n
        contiguous = (pm == ((pos[None] >= s[:, None]) & (pos[None] < e[:, None]))).all()
        if not bool(contiguous):
            return _Plan(False, "padding is not one contiguous run per sample")
        full = False
    if causal:
        e = torch.minimum(e, torch.full_like(e, Sq + d))
        e = torch.maximum(e, s)
    qs = (s - d).clamp(0, Sq)
    qe = (e - d).clamp(0, Sq)
    qe = torch.maximum(qe, qs)
    Lq, Lk = qe - qs, e - s
    free = (not causal) and (not windowed) and G == 0
    if free:
        # plain bidirectional attention: every query row (pad rows too, as in HF eager/sdpa)
        # sees exactly the valid keys; the alignment is irrelevant
        qs = torch.zeros_like(s)
        qe = torch.full_like(s, Sq)
        Lq = qe - qs
    else:
        bad = (Lq > 0) & (e - d > Sq)
        if bool(bad.any()):
            return _Plan(False, "keys extend past the last query (alignment)")
    shift_k = None if (full or not bool((s != 0).any())) else s
    shift_q = None if not bool((qs != 0).any()) else qs
    if G > 0 and (shift_k is not None or shift_q is not None):
        return _Plan(False, "global tokens with left padding")
    sq = None if bool((Lq == Sq).all()) else Lq
    sk = None if bool((Lk == Sk).all()) else Lk
    if sq is not None and sk is None:
        sk = Lk
    if sk is not None and sq is None:
        sq = Lq
    return _Plan(True, seqlens_q=sq, seqlens_k=sk, shift_k=shift_k, shift_q=shift_q, q_end=qe)


def _shift(x, start):
    """x (B, H, S, D): row j of sample b <- row j + start[b] (clamped; the tail is padding)."""
    B, H, S, D = x.shape
    idx = (torch.arange(S, device=x.device)[None] + start[:, None]).clamp(max=S - 1)
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, S, D))


def _unshift(out, start, q_end):
    B, H, S, D = out.shape
    i = torch.arange(S, device=out.device)[None]
    idx = (i - start[:, None]).clamp(0, S - 1)
    res = torch.gather(out, 2, idx[:, None, :, None].expand(B, H, S, D))
    valid = (i >= start[:, None]) & (i < q_end[:, None])
    return res * valid[:, None, :, None].to(res.dtype)


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
        m = _expected(spec.kind, spec.window, q, kv)
    m = m[None, None].expand(B, 1, Sq, Sk)
    if pm is not None:
        m = m & pm[:, None, None, :Sk].bool()
    return m


def _dense_attention(query, key, value, mask, scaling, dropout, softcap, training):
    """Eager-equivalent attention (GQA by repeat) with an additive finfo.min mask."""
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
    return torch.matmul(w, value)


def mmcore_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, sliding_window=None, softcap=None, is_causal=None,
                             **kwargs):
    """AttentionInterface function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) ->
    (out (B, Sq, Hq, D), None)."""
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    if scaling is None:
        scaling = D ** -0.5
    training = bool(getattr(module, "training", False))
    override = getattr(module, OVERRIDE_ATTR, None)
    reason = None
    if softcap is not None:
        reason = "attention logit softcapping"
    elif dropout and training:
        reason = "attention dropout while training"
    elif kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        reason = "attention sinks (s_aux)"
    elif value.shape[-1] != D:
        reason = "value head dim differs from query head dim"
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        STATS.fallback(reason or "dense 4-D mask (pattern not expressible)")
        out = _dense_attention(query, key, value, attention_mask, scaling, dropout, softcap,
                               training)
        return out.transpose(1, 2).contiguous(), None
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
    if reason is None:
        windowed = window != (-1, -1) and window != (-1, 0)
        d = spec.q_offset - spec.kv_offset
        key_ = (Sq, Sk, causal, windowed, G, d)
        cache = getattr(attention_mask, "_mmcore_plans", None)
        plan = cache.get(key_) if cache is not None else None
        if plan is None:
            plan = _plan(pm, B, Sq, Sk, d, causal, windowed, G)
            if getattr(attention_mask, "_mmcore_spec", None) is not None:
                if cache is None:
                    cache = {}
                    attention_mask._mmcore_plans = cache
                cache[key_] = plan
        if not plan.ok:
            reason = plan.reason
        elif G > min(Sk, Sq) or (plan.seqlens_k is not None and G > 0
                                 and bool((plan.seqlens_k < G).any())):
            reason = "more global tokens than keys"
    if reason is not None:
        STATS.fallback(reason)
        mask = _dense_allowed(spec, override, pm, B, Sq, Sk, query.device)
        out = _dense_attention(query, key, value, mask, scaling, dropout, softcap, training)
        return out.transpose(1, 2).contiguous(), None
    q, k, v = query, key, value
    if plan.shift_k is not None:
        k, v = _shift(k, plan.shift_k), _shift(v, plan.shift_k)
    if plan.shift_q is not None:
        q = _shift(q, plan.shift_q)
    backend = getattr(module, "_mmcore_backend", None) or "auto"
    out = window_attention(q, k, v, window=window, causal=causal, global_tokens=G,
                           seqlens_q=plan.seqlens_q, seqlens_k=plan.seqlens_k,
                           scale=float(scaling), backend=backend)
    if plan.shift_q is not None:
        out = _unshift(out, plan.shift_q, plan.q_end)
    STATS.op_calls += 1
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register():
    """Register "mmcore" with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent).  After this, ``from_pretrained(..., attn_implementation="mmcore")`` works."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, mmcore_attention_forward)
    AttentionMaskInterface.register(NAME, mmcore_mask)
    _REGISTERED = True
