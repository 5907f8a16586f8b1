"""Chunked top-k search and ranks (mmcore.train.retrieval_index) against brute force, and the
memory bound by construction: no (queries × gallery) matrix, only score blocks <= max_bytes."""
import math

import pytest
import torch

from kit_memory import LargestTensor
from mmcore.train.retrieval_index import RetrievalIndex, first_relevant_ranks, \
    random_recall_at_k, recall_at_k, topk_search


def _data(Q, N, E, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Q, E, generator=g, dtype=dtype), torch.randn(N, E, generator=g,
                                                                    dtype=dtype)


@pytest.mark.parametrize("Q,N,k,max_bytes", [(37, 501, 10, 8 * 64), (5, 3, 10, 4096),
                                             (1, 1000, 1, 4 * 7), (64, 777, 25, 4 * 64 * 40)])
def test_topk_equals_brute_force(Q, N, k, max_bytes):
    """Blocks smaller than k, a gallery smaller than k, one query, odd chunk sizes: the same
    indices (float64, so no ties) and scores as torch.topk over the full matrix."""
    q, g = _data(Q, N, 24, seed=Q + N)
    s, i = topk_search(q, g, k, max_bytes=max_bytes)
    ref = (q @ g.t()).topk(min(k, N), dim=1)
    assert torch.equal(i, ref.indices)
    assert torch.allclose(s, ref.values, rtol=0, atol=1e-12)


def test_topk_over_chunk_list_counts_indices_through_chunks():
    q, g = _data(9, 300, 16, seed=1)
    parts = [g[:7], g[7:200], g[200:]]
    s, i = topk_search(q, parts, 12, max_bytes=4 * 9 * 50)
    assert torch.equal(i, (q @ g.t()).topk(12, dim=1).indices)


def test_ranks_and_recall_equal_brute_force():
    """Class-level labels: rank = 1 + #(gallery scores above the best relevant score)."""
    q, g = _data(40, 333, 8, seed=2)
    ql = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(3))
    gl = torch.arange(333) % 7
    ranks = first_relevant_ranks(q, g, ql, gl, max_bytes=4 * 40 * 31)
    S = q @ g.t()
    best = S.masked_fill(gl[None] != ql[:, None], float("-inf")).max(1).values
    assert torch.equal(ranks, (S > best[:, None]).sum(1) + 1)
    _, top = topk_search(q, g, 10, max_bytes=4 * 40 * 31)
    rec = recall_at_k(top, ql, gl, (1, 5, 10))
    for k in (1, 5, 10):
        assert rec[k] == pytest.approx(float((ranks <= k).double().mean()))


def test_random_baseline_formula():
    """Balanced 10 classes of 100: recall@1 = 0.1, recall@k = 1 − C(900, k)/C(1000, k),
    mean rank = 1001 / 101."""
    lab = torch.arange(1000) % 10
    r = random_recall_at_k(lab, lab, (1, 5))
    assert r[1] == pytest.approx(0.1)
    assert r[5] == pytest.approx(1 - math.comb(900, 5) / math.comb(1000, 5))
    assert r["mean_rank"] == pytest.approx(1001 / 101)


def test_memory_bound_by_construction():
    """Q=120 queries x N=12,000 gallery: the largest tensor any op makes is one score block
    (<= max_bytes / 4 elements), 1/40 of the (Q, N) matrix; and the same holds for ranks."""
    Q, N, E, budget = 120, 12_000, 32, 4 * 120 * 300
    q, g = _data(Q, N, E, seed=5, dtype=torch.float32)
    with LargestTensor() as m:
        topk_search(q, g, 10, max_bytes=budget)
    assert m.numel <= budget // 4, (m.op, m.shape)
    assert m.numel * 40 <= Q * N
    lab = torch.arange(N) % 10
    with LargestTensor() as m:
        first_relevant_ranks(q, g, lab[:Q], lab, max_bytes=budget)
    assert m.numel <= budget // 4, (m.op, m.shape)


def test_index_batches_normalise_and_fp16_storage():
    """Gallery added in batches (kept as chunks), cosine scores, 16-bit storage searched in
    fp32; instance-level labels default to running ids."""
    q, g = _data(20, 250, 12, seed=6, dtype=torch.float32)
    idx = RetrievalIndex(12, dtype=torch.float16)
    for a in range(0, 250, 64):
        idx.add(g[a:a + 64] * 3.0)
    assert len(idx) == 250 and len(idx.chunks) == 4
    assert torch.equal(idx.gallery_labels(), torch.arange(250))
    s, i = idx.search(q, k=5)
    gn = torch.nn.functional.normalize(g, dim=-1).half().float()
    ref = (torch.nn.functional.normalize(q, dim=-1) @ gn.t()).topk(5, dim=1)
    assert torch.equal(i, ref.indices)
    ranks = idx.ranks(q, i[:, 2])  # relevant item = the 3rd retrieved
    assert torch.equal(ranks, torch.full((20,), 3))


def test_bad_inputs_name_the_argument():
    q, g = _data(3, 10, 4)
    with pytest.raises(ValueError, match="k must"):
        topk_search(q, g, 0)
    with pytest.raises(ValueError, match="gallery chunk 0"):
        topk_search(q, torch.randn(10, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="queries"):
        topk_search(q[0], g, 2)
    with pytest.raises(ValueError, match="no relevant item"):
        first_relevant_ranks(q, g, torch.tensor([0, 1, 99]), torch.arange(10) % 2)
    with pytest.raises(ValueError, match="embeddings"):
        RetrievalIndex(4).add(torch.randn(3, 5))
