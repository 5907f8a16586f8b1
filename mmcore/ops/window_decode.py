"""Internal entry point: window attention over RollingKVCache's own layout, read in place.

window_attention's contract takes keys in position order, so RollingKVCache.update gathers
prefix + ring + chunk into a new tensor every step.  The `cuda` backend's decode kernel can
instead read the three pieces where they are (csrc/cuda/window_decode_plan.h, KeyMap)::

    position j <  min(G, pos)       k_glob[:, :, j]          global prefix
    position j >= pos               k_new[:, :, j - pos]     the chunk being appended
    otherwise                       k_ring[:, :, j % W]      ring buffer (read before the write)

RollingKVCache.attend calls :func:`rolling_window_decode` when the registry picks the `cuda`
backend for the step (forced, or selected by a measured tuning table), then writes the chunk.
The result equals ``window_attention(q, keys_in_order, ..., window=(left, 0), causal=True,
global_tokens=min(G, pos + T))``.  On CPU tensors the same op runs the kernel's CPU emulation
(used by the tests).
"""
from __future__ import annotations

import torch

from . import _validate as V
from . import registry
from .reference.attention import default_scale


def rolling_kernel_selected(q, k_new, v_new, pos, left, global_tokens, backend="auto") -> bool:
    """Whether window_attention's dispatch picks the `cuda` decode kernel for this cache step
    (q (B, Hq, T, D) at positions [pos, pos + T)): then the cache is read in place."""
    T = q.shape[2]
    g = min(global_tokens, pos + T)
    Sk = g + pos + T - max(g, pos - left)  # the keys the gathered path would pass
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_new, v_new))
    p = registry.Problem("window_attention", q.device.type, q.dtype, head_dim=q.shape[-1],
                         gqa=q.shape[1] != k_new.shape[1], needs_grad=needs_grad, global_tokens=g,
                         extra={"Sq": T, "Sk": Sk, "window": (left, 0)})
    try:
        return registry.select("window_attention", p, backend).backend == "cuda"
    except registry.BackendError:  # the gathered path raises the full report
        return False


def rolling_window_decode(q, k_new, v_new, k_glob, v_glob, k_ring, v_ring, *, pos, left,
                          global_tokens, scale=None, num_splits=0):
    """Causal window attention of the chunk q over a rolling cache, without a gather copy.

    Args:
        q: (B, Hq, T, D) queries at positions [pos, pos + T), T <= 16, bf16 / fp16.
        k_new, v_new: (B, Hkv, T, D) the chunk's keys / values (not yet in the cache).
        k_glob, v_glob: (B, Hkv, G, D) the global prefix (positions [0, G)).
        k_ring, v_ring: (B, Hkv, W, D) ring buffer, position j >= G at slot j % W, W > left.
        pos: positions already in the cache; left: the window's left side (>= 0);
        global_tokens: G; scale: default 1/sqrt(D); num_splits: 0 = automatic.
    Returns out (B, Hq, T, D) in q's dtype.
    """
    V.tensor("q", q, ndim=4)
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_glob", k_glob), ("v_glob", v_glob),
                    ("k_ring", k_ring), ("v_ring", v_ring)):
        V.tensor(name, t, ndim=4)
    V.same_dtype("q", q, k_new=k_new, v_new=v_new, k_glob=k_glob, v_glob=v_glob, k_ring=k_ring,
                 v_ring=v_ring)
    V.same_device("q", q, k_new=k_new, v_new=v_new, k_glob=k_glob, v_glob=v_glob,
                  k_ring=k_ring, v_ring=v_ring)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.mmcore_C.window_decode(q, k_new, v_new, k_glob, v_glob, k_ring, v_ring,
                                              None, None, int(pos), int(left), 0, True,
                                              int(global_tokens), scale, int(num_splits))
    return out


def _register_fakes():
    """Shapes of the mmcore_C CUDA ops for torch.compile / meta tensors."""
    try:
        torch.ops.mmcore_C.window_decode
    except (AttributeError, RuntimeError):  # mmcore._C missing: nothing to describe
        return

    @torch.library.register_fake("mmcore_C::window_decode")
    def _(q, k, v, k_glob, v_glob, k_ring, v_ring, seqlens_q, seqlens_k, pos, left, right,
          causal, global_tokens, scale, num_splits):
        B, H, S, D = q.shape
        return q.new_empty(B, H, S, D), q.new_empty(B, H, S, dtype=torch.float32)

    @torch.library.register_fake("mmcore_C::lora_sgmv_fwd")
    def _(x, weight, bias, lora_a, lora_b, scaling, adapter_ids, ksplits):
        return x.new_empty(x.shape[0], weight.shape[0])
