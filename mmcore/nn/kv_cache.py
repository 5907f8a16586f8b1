"""RollingKVCache: constant-memory decoding for sliding-window attention with attention sinks.

A causal layer with ``window=(left, 0)`` and ``global_tokens=G`` only ever looks at the G first
positions (the global prefix / attention sinks) and the ``left`` positions before a query.  The
cache keeps, per layer::

    global prefix   k/v (B, Hkv, G, D)         positions [0, G), written once
    ring buffer     k/v (B, Hkv, left + 1, D)  the newest positions >= G, slot = position % (left+1)

so its memory is O(G + left + 1) per layer whatever the length read.  ``attend`` appends a chunk
of T new tokens (chunked prefill: any T, also larger than the window; decoding: T = 1) and runs
``mmcore.window_attention`` on the keys the chunk needs, in position order::

    keys = prefix[0 : min(G, pos+T)] ++ positions [max(G, pos - left), pos + T)
           (ring, oldest first, then the chunk)

with ``causal=True, window=(left, 0), global_tokens=min(G, pos+T)``.  Bottom-right alignment puts
the chunk's queries on the last T keys.  Positions missing from that list (between the prefix
and the window) are exactly those no query of the chunk can see, so the result equals one
window_attention call over the whole sequence.

When dispatch picks the `cuda` backend for a step (T <= 16; forced with ``backend="cuda"`` or
chosen by a measured tuning table), ``attend`` skips that gather: the decode kernel reads the
prefix, the ring and the chunk where they are (mmcore.ops.window_decode), then the chunk is
written.  Same result, no copy of the window per step.

Positions are batch-uniform: every sample of the batch advances by the same T per call (pad
prompts on the left, or run one cache per sample, for ragged batches).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.window_attention import window_attention
from ..ops.window_decode import rolling_kernel_selected, rolling_window_decode


def _device(device) -> torch.device:
    """A device this machine has: a bad name or CUDA without a GPU is a ValueError naming
    `device`, not torch's AssertionError at the first allocation."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if dev.type == "cuda":
        if dev.index is None:  # tensors report cuda:N; compare like with like
            return torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    return dev


class RollingKVCache:
    """Per-layer global prefix + ring buffer of the last ``window_left + 1`` keys/values.

    Args:
        num_layers: layers in the model (one prefix + ring each).
        batch, kv_heads, head_dim: shape of k/v per token: (batch, kv_heads, 1, head_dim).
        window_left: ``left`` of the layers' ``window=(left, 0)`` (>= 0; an unbounded window
            has no constant-memory cache).  HF ``sliding_window=w`` is ``window_left = w - 1``.
        global_tokens: G, the attention-sink prefix kept forever.
        dtype, device: of the stored keys/values (and of k_new / v_new).

    Use::

        cache = RollingKVCache(L, B, Hkv, D, window_left=255, global_tokens=4)
        out = cache.attend(layer, q, k_new, v_new)   # q (B, Hq, T, D), k/v_new (B, Hkv, T, D)

    Each layer counts its own positions: ``attend`` / ``update`` append T tokens to that layer
    (``cache.length(layer)``).  ``reset()`` starts a new sequence.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 window_left: int, global_tokens: int = 0, dtype: torch.dtype = torch.float32,
                 device="cpu"):
        for name, val, lo in (("num_layers", num_layers, 1), ("batch", batch, 1),
                              ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1),
                              ("window_left", window_left, 0), ("global_tokens", global_tokens, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
            if val >= 2 ** 31:
                raise ValueError(f"{name} must be < 2**31, got {val}")
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float16, torch.bfloat16,
                                                               torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float16, bfloat16, float32 or float64, "
                            f"got {dtype!r}")
        self.num_layers, self.batch, self.kv_heads, self.head_dim = (num_layers, batch, kv_heads,
                                                                     head_dim)
        self.left, self.G = window_left, global_tokens
        self.capacity = window_left + 1
        self.dtype, self.device = dtype, _device(device)
        shape_g = (batch, kv_heads, global_tokens, head_dim)
        shape_r = (batch, kv_heads, self.capacity, head_dim)
        mk = lambda shape: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        try:
            self.k_global = [mk(shape_g) for _ in range(num_layers)]
            self.v_global = [mk(shape_g) for _ in range(num_layers)]
            self.k_ring = [mk(shape_r) for _ in range(num_layers)]
            self.v_ring = [mk(shape_r) for _ in range(num_layers)]
        except (RuntimeError, MemoryError) as e:
            raise ValueError(f"the cache (num_layers={num_layers}, window_left={window_left}, "
                             f"global_tokens={global_tokens}) does not fit in memory: "
                             f"{str(e).splitlines()[0]}") from None
        self._pos = [0] * num_layers  # tokens already read, per layer (batch-uniform)

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget the sequence (the buffers are reused)."""
        self._pos = [0] * self.num_layers

    def length(self, layer: int = 0) -> int:
        """Tokens appended to `layer` so far (the position of its next token)."""
        return self._pos[layer]

    def nbytes(self) -> int:
        """Bytes held by the cache (constant: does not grow with the length read)."""
        ts = self.k_global + self.v_global + self.k_ring + self.v_ring
        return sum(t.numel() * t.element_size() for t in ts)

    def _check(self, layer, k_new, v_new):
        if (not isinstance(layer, int) or isinstance(layer, bool)
                or not 0 <= layer < self.num_layers):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if (t.dim() != 4 or t.shape[0] != self.batch or t.shape[1] != self.kv_heads
                    or t.shape[3] != self.head_dim or t.shape[2] < 1):
                raise ValueError(f"{name} must have shape ({self.batch}, {self.kv_heads}, T>=1, "
                                 f"{self.head_dim}), got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} "
                             f"must have the same shape")

    # ------------------------------------------------------------------ the cache proper
    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store a chunk of T tokens (positions [pos, pos+T)) and return the keys its queries
        need: ``(k, v, global_tokens)`` with k/v (B, Hkv, Sk, D) in position order, to be used
        with ``window=(left, 0), causal=True, global_tokens=global_tokens`` (bottom-right
        alignment: the chunk's queries are the last T positions)."""
        self._check(layer, k_new, v_new)
        k, v, g = self._keys(layer, k_new, v_new)
        self._write(layer, k_new, v_new)
        return k, v, g

    def _keys(self, layer, k_new, v_new):
        """The keys/values a chunk at positions [pos, pos+T) sees, gathered in position order."""
        T, pos, G, W = k_new.shape[2], self._pos[layer], self.G, self.capacity
        g = min(G, pos + T)  # prefix positions that exist after this chunk
        s0 = max(g, pos - self.left)  # first non-prefix position the chunk can see
        kg, vg, kr, vr = (self.k_global[layer], self.v_global[layer], self.k_ring[layer],
                          self.v_ring[layer])
        # keys in position order: prefix [0, g), ring [s0, pos), chunk [max(pos, g), pos+T)
        c0 = max(pos, g) - pos  # chunk tokens that are not prefix positions
        parts_k, parts_v = [], []
        if pos > 0 and min(G, pos) > 0:
            parts_k.append(kg[:, :, :min(G, pos)])
            parts_v.append(vg[:, :, :min(G, pos)])
        if g > pos:  # the chunk itself fills prefix positions [pos, g)
            parts_k.append(k_new[:, :, :g - pos])
            parts_v.append(v_new[:, :, :g - pos])
        if pos > s0:
            idx = torch.arange(s0, pos, device=self.device) % W
            parts_k.append(kr.index_select(2, idx))
            parts_v.append(vr.index_select(2, idx))
        parts_k.append(k_new[:, :, c0:])
        parts_v.append(v_new[:, :, c0:])
        k = torch.cat(parts_k, 2) if len(parts_k) > 1 else parts_k[0]
        v = torch.cat(parts_v, 2) if len(parts_v) > 1 else parts_v[0]
        return k, v, g

    def _write(self, layer, k_new, v_new):
        """Store the chunk: prefix positions once, the newest W other positions in the ring."""
        T, pos, G, W = k_new.shape[2], self._pos[layer], self.G, self.capacity
        g = min(G, pos + T)
        c0 = max(pos, g) - pos  # chunk tokens that are not prefix positions
        kg, vg, kr, vr = (self.k_global[layer], self.v_global[layer], self.k_ring[layer],
                          self.v_ring[layer])
        if g > pos:
            kg[:, :, pos:g] = k_new[:, :, :g - pos]
            vg[:, :, pos:g] = v_new[:, :, :g - pos]
        r0 = max(pos + c0, pos + T - W)
        if r0 < pos + T:
            idx = torch.arange(r0, pos + T, device=self.device) % W
            kr.index_copy_(2, idx, k_new[:, :, r0 - pos:].to(kr.dtype))
            vr.index_copy_(2, idx, v_new[:, :, r0 - pos:].to(vr.dtype))
        self._pos[layer] = pos + T

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
        """Append k_new/v_new (B, Hkv, T, D) to `layer` and attend q (B, Hq, T, D) causally over
        the global prefix and the last `left` positions.  Returns (B, Hq, T, D).

        scale defaults to 1/sqrt(D); backend as in mmcore.window_attention."""
        self._check(layer, k_new, v_new)
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != k_new.shape[2]:
            raise ValueError(f"q must be (B, Hq, T, D) with T = k_new.shape[2] "
                             f"({k_new.shape[2]}), got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q)}")
        self._check(layer, k_new, v_new)
        if rolling_kernel_selected(q, k_new, v_new, self._pos[layer], self.left, self.G,
                                   backend):
            out = rolling_window_decode(
                q, k_new, v_new, self.k_global[layer], self.v_global[layer],
                self.k_ring[layer], self.v_ring[layer], pos=self._pos[layer], left=self.left,
                global_tokens=self.G, scale=scale)
            self._write(layer, k_new, v_new)  # after the read: the ring slots are reused
            return out
        k, v, g = self.update(layer, k_new, v_new)
        return window_attention(q, k, v, window=(self.left, 0), causal=True, global_tokens=g,
                                scale=scale, backend=backend)

    def __repr__(self):
        return (f"RollingKVCache(layers={self.num_layers}, batch={self.batch}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, left={self.left}, "
                f"global_tokens={self.G}, length={self._pos[0]}, dtype={self.dtype}, "
                f"device={self.device})")
