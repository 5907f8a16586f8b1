"""Top-k search over a large gallery without the (queries × gallery) score matrix.

The gallery is scanned in chunks; each chunk's (query block × chunk) scores are reduced to
their top k at once and merged into a running top k per query.  The biggest temporary is one
(query block × chunk) fp32 score block of at most `max_bytes` (256 MiB by default) — ranks
add a bool mask a quarter of its size — whatever the gallery size.  Measured on a 1M × 384
fp32 gallery (1.5 GB itself; benchmarks/retrieval_memory.py, 1,000 queries): top-10 search
261 MiB and ranks 338 MiB of peak RSS beyond the gallery.

    index = RetrievalIndex(dim=384)
    for emb, lab in batches:                      # embeddings computed batch by batch
        index.add(emb, lab)                       # (b, 384), (b,) — kept as chunks, no concat
    scores, ids = index.search(queries, k=10)     # (Q, 10) each, best first
    ranks = index.ranks(queries, query_labels)    # (Q,) rank of the first relevant item

Scores are inner products (cosine when both sides are L2-normalised, which `add` and the
tasks do).  Relevance is label equality: class-level labels (a query "the digit seven" is
answered by any image of a 7) or one id per pair (instance-level).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["RetrievalIndex", "topk_search", "first_relevant_ranks", "recall_at_k",
           "random_recall_at_k", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 256 * 2**20
Gallery = Union[torch.Tensor, Sequence[torch.Tensor]]


def _chunks(gallery: Gallery) -> List[torch.Tensor]:
    if isinstance(gallery, torch.Tensor):
        if gallery.dim() != 2:
            raise ValueError(f"gallery must be (N, E), got shape {tuple(gallery.shape)}")
        return [gallery]
    out = list(gallery)
    for i, c in enumerate(out):
        if not isinstance(c, torch.Tensor) or c.dim() != 2:
            raise ValueError(f"gallery chunk {i} must be an (n, E) tensor")
    return out


def _blocks(queries: torch.Tensor, chunks: List[torch.Tensor], k: int, max_bytes: int,
            query_batch: Optional[int]):
    """Yield (q0, q1, qb (Qb, E)) and a fn giving (offset, view (Nc, E)) gallery slices whose
    (Qb, Nc) fp32 score block fits in max_bytes."""
    if queries.dim() != 2:
        raise ValueError(f"queries must be (Q, E), got shape {tuple(queries.shape)}")
    E = queries.shape[1]
    for i, c in enumerate(chunks):
        if c.shape[1] != E:
            raise ValueError(f"queries have {E} dims but gallery chunk {i} has {c.shape[1]}")
    if not isinstance(max_bytes, int) or max_bytes < 4:
        raise ValueError(f"max_bytes must be an int >= 4, got {max_bytes!r}")
    Q = queries.shape[0]
    Qb = max(1, min(Q, query_batch or 4096, max_bytes // (4 * max(k, 1))))
    Nc = max(k, max_bytes // (4 * Qb))

    def slices():
        off = 0
        for c in chunks:
            for a in range(0, c.shape[0], Nc):
                yield off + a, c[a:a + Nc]
            off += c.shape[0]

    for q0 in range(0, Q, Qb):
        yield q0, min(Q, q0 + Qb), queries[q0:q0 + Qb], slices


def _scores(qb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(Qb, E) x (Nc, E) -> (Qb, Nc) in the queries' compute dtype (fp32 for 16-bit)."""
    cdt = torch.float64 if qb.dtype == torch.float64 else torch.float32
    return qb.to(cdt) @ g.to(device=qb.device, dtype=cdt).t()


def topk_search(queries: torch.Tensor, gallery: Gallery, k: int, *,
                max_bytes: int = DEFAULT_MAX_BYTES, query_batch: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items per query by inner product.

    queries (Q, E); gallery (N, E) or a list of (n_i, E) chunks (indices count through them
    in order).  Returns (scores (Q, k') fp32/fp64, indices (Q, k') int64), best first,
    k' = min(k, N).  Extra memory: one (Qb, Nc) score block <= max_bytes plus the results."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    chunks = _chunks(gallery)
    N = sum(c.shape[0] for c in chunks)
    if N == 0:
        raise ValueError("the gallery is empty")
    kk = min(k, N)
    cdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
    best_s = torch.empty(queries.shape[0], kk, dtype=cdt, device=queries.device)
    best_i = torch.empty(queries.shape[0], kk, dtype=torch.long, device=queries.device)
    for q0, q1, qb, slices in _blocks(queries, chunks, kk, max_bytes, query_batch):
        s_run = torch.full((q1 - q0, 0), float("-inf"), dtype=cdt, device=queries.device)
        i_run = torch.empty(q1 - q0, 0, dtype=torch.long, device=queries.device)
        for off, g in slices():
            top = _scores(qb, g).topk(min(kk, g.shape[0]), dim=1)  # (Qb, <=k)
            s_cat = torch.cat([s_run, top.values], 1)
            i_cat = torch.cat([i_run, top.indices + off], 1)
            keep = s_cat.topk(min(kk, s_cat.shape[1]), dim=1)
            s_run, i_run = keep.values, i_cat.gather(1, keep.indices)
        best_s[q0:q1], best_i[q0:q1] = s_run, i_run
    return best_s, best_i


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """(Qb, n) bool -> (Qb,) int64 counts, summed in column slices: torch casts a bool
    tensor to int64 before a sum, and a slice of n / 8 columns keeps that copy no larger
    than the mask itself."""
    w = max(1, mask.shape[1] // 8)
    return sum(part.sum(1) for part in mask.split(w, dim=1))


def first_relevant_ranks(queries: torch.Tensor, gallery: Gallery, query_labels,
                         gallery_labels, *, max_bytes: int = DEFAULT_MAX_BYTES,
                         query_batch: Optional[int] = None) -> torch.Tensor:
    """Rank (1-based) of each query's best-scoring relevant gallery item: 1 + the number of
    gallery items scoring strictly higher (ties count in the query's favour).  Two chunked
    passes (the best relevant score, then the count above it); no (Q, N) matrix.

    query_labels (Q,), gallery_labels (N,) int: relevant iff equal.  Every query needs at
    least one relevant item (ValueError otherwise).  Returns (Q,) int64."""
    chunks = _chunks(gallery)
    ql = torch.as_tensor(query_labels).long().to(queries.device)
    gl = torch.as_tensor(gallery_labels).long().to(queries.device)
    N = sum(c.shape[0] for c in chunks)
    if ql.shape != queries.shape[:1]:
        raise ValueError(f"query_labels must have shape ({queries.shape[0]},), got "
                         f"{tuple(ql.shape)}")
    if gl.shape != (N,):
        raise ValueError(f"gallery_labels must have shape ({N},), got {tuple(gl.shape)}")
    ranks = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for q0, q1, qb, slices in _blocks(queries, chunks, 1, max_bytes, query_batch):
        lab = ql[q0:q1, None]
        best = None
        for off, g in slices():  # the same score blocks in both passes: exact comparisons
            s = _scores(qb, g).masked_fill_(gl[None, off:off + g.shape[0]] != lab,
                                            float("-inf"))
            m = s.max(1).values
            del s  # before the next block exists: one block alive at a time
            best = m if best is None else torch.maximum(best, m)
        if torch.isinf(best).any():
            bad = int(torch.isinf(best).nonzero()[0]) + q0
            raise ValueError(f"query {bad} (label {int(ql[bad])}) has no relevant item in the "
                             f"gallery")
        above = torch.zeros(q1 - q0, dtype=torch.long, device=qb.device)
        for off, g in slices():
            above += _count_true(_scores(qb, g) > best[:, None])
        ranks[q0:q1] = above + 1
    return ranks


def recall_at_k(top_indices: torch.Tensor, query_labels, gallery_labels,
                ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Fraction of queries with a relevant item among their first k results.
    top_indices (Q, >= max k) from topk_search.  -> {k: recall}."""
    ql = torch.as_tensor(query_labels).long().cpu()
    gl = torch.as_tensor(gallery_labels).long().cpu()
    hit = gl[top_indices.cpu()] == ql[:, None]  # (Q, K)
    return {k: float(hit[:, :k].any(1).double().mean()) for k in ks}


def random_recall_at_k(query_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Expected recall@k of a random ranking: 1 − C(N − n_q, k) / C(N, k) per query (n_q its
    relevant items), averaged — for class-level labels with 10 balanced classes, ≈ 0.1 at
    k = 1.  Also "mean_rank": the expected first-relevant rank (N + 1) / (n_q + 1)."""
    ql = torch.as_tensor(query_labels).long().cpu()
    gl = torch.as_tensor(gallery_labels).long().cpu()
    N = gl.numel()
    counts = torch.bincount(gl, minlength=int(max(ql.max(), gl.max())) + 1).double()
    n = counts[ql]  # (Q,)
    out = {}
    for k in ks:
        miss = torch.ones_like(n)  # Π_{t<k} (N − n − t) / (N − t)
        for t in range(min(k, N)):
            miss = miss * ((N - n - t).clamp_min(0) / (N - t))
        out[k] = float((1 - miss).mean())
    out["mean_rank"] = float(((N + 1) / (n + 1)).mean())
    return out


class RetrievalIndex:
    """A gallery of embeddings added batch by batch (kept as a list of chunks: no final
    concatenation, so no second copy of a large gallery), with labels for evaluation.

    dim: E; normalize: L2-normalise what is added and searched (cosine similarity);
    dtype: storage dtype, floating point only (fp16 / bf16 halve the gallery; scores are
    computed in fp32).  Embeddings or queries with NaN / inf rows are refused (ValueError
    naming the rows), never ranked."""

    def __init__(self, dim: int, *, normalize: bool = True, dtype=torch.float32,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or \
                dtype.itemsize < 2:
            raise ValueError(f"dtype must be a floating-point storage dtype (float32, float16, "
                             f"bfloat16, float64), got {dtype!r}; integer storage would round "
                             f"normalised embeddings to 0")
        self.dim, self.normalize, self.dtype, self.max_bytes = dim, normalize, dtype, max_bytes
        self.chunks: List[torch.Tensor] = []
        self.labels: List[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    def _prep(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be (n, {self.dim}), got {got}")
        if not (x.is_floating_point()):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
        x = x.detach()
        bad = ~torch.isfinite(x).all(1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{name}: rows {rows[:8]}{' ...' if len(rows) > 8 else ''} hold "
                             f"NaN or inf ({len(rows)} of {x.shape[0]}); a non-finite "
                             f"embedding has no meaningful score: drop those rows first")
        return F.normalize(x.float(), dim=-1) if self.normalize else x

    def add(self, embeddings: torch.Tensor, labels=None) -> None:
        """embeddings (b, E); labels (b,) int or None (then: running item ids)."""
        e = self._prep(embeddings, "embeddings").to(self.dtype)
        n0 = len(self)
        lab = torch.arange(n0, n0 + e.shape[0]) if labels is None else \
            torch.as_tensor(labels).long().cpu()
        if lab.shape != (e.shape[0],):
            raise ValueError(f"labels must have shape ({e.shape[0]},), got {tuple(lab.shape)}")
        self.chunks.append(e)
        self.labels.append(lab)

    def gallery_labels(self) -> torch.Tensor:
        return torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long)

    def search(self, queries: torch.Tensor, k: int = 10):
        """-> (scores (Q, k), indices (Q, k)) best first."""
        return topk_search(self._prep(queries, "queries"), self.chunks, k,
                           max_bytes=self.max_bytes)

    def ranks(self, queries: torch.Tensor, query_labels) -> torch.Tensor:
        """(Q,) 1-based rank of each query's first relevant item."""
        return first_relevant_ranks(self._prep(queries, "queries"), self.chunks, query_labels,
                                    self.gallery_labels(), max_bytes=self.max_bytes)
