"""Issue 16, item 17: RollingKVCache arguments give errors that name them."""
import pytest
import torch

import mmcore


def test_kv_cache_device_and_missing_tensors():
    """Issue 16, item 17: RollingKVCache(..., device='cuda') on a machine without CUDA raised
    torch's AssertionError at the first allocation, and attend(layer, q, None, v) an
    AttributeError (k_new.shape).  Both are now errors naming the argument; so are a bad
    device string, a non-float dtype, a bool layer and a window too long to allocate."""
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            mmcore.RollingKVCache(1, 1, 1, 8, window_left=3, device="cuda")
    with pytest.raises(ValueError, match="device"):
        mmcore.RollingKVCache(1, 1, 1, 8, window_left=3, device="tpu:0")
    with pytest.raises(TypeError, match="dtype"):
        mmcore.RollingKVCache(1, 1, 1, 8, window_left=3, dtype=torch.int32)
    with pytest.raises(ValueError, match="window_left"):
        mmcore.RollingKVCache(1, 1, 1, 8, window_left=2 ** 31)
    cache = mmcore.RollingKVCache(1, 2, 2, 8, window_left=3)
    q = torch.randn(2, 2, 1, 8)
    for k_new, v_new, name in ((None, q, "k_new"), (q, None, "v_new"), ([1.0], q, "k_new")):
        with pytest.raises(TypeError, match=name):
            cache.attend(0, q, k_new, v_new)
    with pytest.raises(ValueError, match="layer"):
        cache.attend(True, q, q, q)
    assert cache.length(0) == 0  # nothing was appended by the failed calls
    assert cache.attend(0, q, q, q).shape == (2, 2, 1, 8)
