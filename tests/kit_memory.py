"""Memory bounds by construction: record the largest tensor any torch op produces in a block.

    with LargestTensor() as m:
        f(...)
    assert m.numel <= bound, m.op   # no op made a tensor bigger than `bound` elements

A TorchDispatchMode sees every op's outputs (views and in-place ops included), so a
(queries × gallery) score matrix or an (Sq × Sk) attention matrix anywhere in the block shows
up as its numel, whatever allocator the CPU uses.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                # a view of an input is not new memory: count the storage it owns only when
                # the op allocated it (its storage is not an input's)
                if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr()
                       == t.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))):
                    continue
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out
