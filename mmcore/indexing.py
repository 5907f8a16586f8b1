"""A folder of text files as one searchable index of passage vectors.

    import mmcore
    mmcore.index("reports/", "reports.idx")                 # encode every text file once
    hits = mmcore.search("reports.idx", "who audited the 2019 accounts?", top_k=5)
    hits[0]                     # {"rank", "file", "start", "end", "score", "text"}

Every file is read as ``[CLS] text [SEP]`` exactly as ``mmcore.read`` reads a document
(window attention, [CLS] global, wrapped positions) and cut into the same sentence passages;
a passage's vector is the L2-normalised mean of its contextual token vectors.  Short files
are batched together, sorted by length, with per-sample lengths (the ops' seqlens_q /
seqlens_k); a file longer than `long_tokens` runs alone through the memory-bounded
``TextEncoder.encode_long``.

On disk (a directory)::

    INDEX/manifest.json          format, model fingerprint, window, files {path: sha256,
                                 size, tokens, passages, shard}, shard names
    INDEX/shards/NNNNNN.safetensors
        vectors  (P, H) float32  L2-normalised passage vectors
        file     (P,)   int32    index into the shard's file list (metadata "files")
        start, end (P,) int64    character offsets of the passage in its file
        text     (T,)   uint8    the passages' UTF-8 text, concatenated
        text_off (P+1,) int64    passage p's text is text[text_off[p]:text_off[p+1]]

Each batch of files is committed as one shard (written to a temporary file, then
``os.replace``) followed by the manifest (the same way), so a killed run leaves the index as
of its last commit and the next run goes on from there.  Re-indexing compares content hashes:
new and changed files are encoded, deleted ones dropped; a passage row is live only while the
manifest maps its file to its shard; shards left with no live rows are deleted and those
with fewer than half live are rewritten.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import optional

__all__ = ["index", "search", "Index", "PassageEncoder", "BadIndexError", "FORMAT", "VERSION",
           "scan_folder"]

FORMAT = "mmcore-index"
VERSION = 1
_MANIFEST = "manifest.json"
_SHARDS = "shards"


class BadIndexError(ValueError):
    """An index that cannot be used (missing, corrupt, another model / format version)."""


# ------------------------------------------------------------------ files


@dataclass
class ScanResult:
    files: List[Tuple[str, str]] = field(default_factory=list)  # (relative path, full path)
    skipped: Dict[str, str] = field(default_factory=dict)  # relative path -> reason


def scan_folder(folder: str, exclude: Tuple[str, ...] = ()) -> ScanResult:
    """Every regular file under `folder` (symlinks followed, each real directory visited
    once; hidden files and directories skipped), sorted.  Entries that cannot be visited
    (a symlink loop, a dangling link, an unreadable directory) land in `skipped`."""
    res = ScanResult()
    root = os.path.abspath(folder)
    excl = {os.path.realpath(e) for e in exclude}
    seen = set()

    def walk(d, rel):
        try:
            st = os.stat(d)
        except OSError as e:
            res.skipped[rel or "."] = _os_reason(e)
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            res.skipped[rel] = "symlink loop (a link to a directory already visited)"
            return
        seen.add(key)
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            res.skipped[rel or "."] = f"unreadable directory ({_os_reason(e)})"
            return
        for n in names:
            if n.startswith("."):
                continue
            full, r = os.path.join(d, n), (f"{rel}/{n}" if rel else n)
            if os.path.realpath(full) in excl:
                continue
            try:
                st = os.stat(full)
            except OSError as e:
                res.skipped[r] = _os_reason(e)
                continue
            if os.path.isdir(full):
                walk(full, r)
            elif os.path.isfile(full):
                res.files.append((r, full))
            else:
                res.skipped[r] = "not a regular file"

    walk(root, "")
    return res


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "dangling symlink"
    return f"unreadable ({e.strerror or e})"


class Skip(Exception):
    """A file that is not indexed; the message is the reason."""


def read_text(path: str) -> Tuple[str, str, int]:
    """-> (text, sha256 hex of the bytes, size).  Raises Skip for unreadable, empty, binary
    (NUL bytes) and non-UTF-8 files."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Skip(_os_reason(e)) from None
    if not data.strip():
        raise Skip("empty")
    if b"\x00" in data:
        raise Skip(f"binary (NUL byte at offset {data.index(0)})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Skip(f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text, hashlib.sha256(data).hexdigest(), len(data)


def _hash(path: str) -> Tuple[Optional[str], int, Optional[str]]:
    """(sha256, size, None) or (None, 0, reason)."""
    try:
        _, h, n = read_text(path)
        return h, n, None
    except Skip as e:
        return None, 0, str(e)


# ------------------------------------------------------------------ model identity


def model_fingerprint(model_dir: str) -> str:
    """sha256 over config.json, tokenizer.json and every safetensors header of the dir:
    changes when the architecture, vocabulary or weights layout changes."""
    h = hashlib.sha256()
    names = sorted(os.listdir(model_dir))
    for n in names:
        p = os.path.join(model_dir, n)
        if n in ("config.json", "tokenizer.json"):
            with open(p, "rb") as f:
                h.update(n.encode() + f.read())
        elif n.endswith(".safetensors"):
            with open(p, "rb") as f:
                head = f.read(8)
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(n.encode() + head + f.read(min(size, 1 << 26)))
                f.seek(0, 2)
                h.update(str(f.tell()).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ encoding


class PassageEncoder:
    """Tokenizer + TextEncoder: documents -> passages and their normalised vectors."""

    def __init__(self, model: Optional[str] = None, *, window=(128, 128), device="cpu",
                 dtype=torch.float32, chunk: int = 4096, batch_tokens: int = 16384,
                 long_tokens: int = 16384):
        from .models import TextEncoder, default_text_model
        from .reading import Tokenizer

        self.model = os.path.abspath(os.fspath(model or default_text_model()))
        self.tok = Tokenizer(self.model)
        self.enc = TextEncoder.from_pretrained(self.model, dtype=dtype, device=device)
        self.window = tuple(window) if window is not None else None
        self.device = torch.device(device)
        self.chunk, self.batch_tokens, self.long_tokens = chunk, batch_tokens, long_tokens
        self.pad = self.enc.config.pad_token_id

    @property
    def dim(self) -> int:
        return self.enc.config.hidden_size

    def tokenize(self, text: str):
        """-> ids (N,) int32, spans [(t0, t1, c0, c1)] (may be empty)."""
        from .reading import split_passages

        ids, offs = self.tok.document(text)
        return ids, split_passages(text, offs)

    @torch.no_grad()
    def query(self, text: str) -> torch.Tensor:
        """(H,) float32 normalised query vector (full attention, mean-pooled)."""
        from .models import mean_pool

        q = torch.tensor([self.tok.query(text)], device=self.device)
        return F.normalize(mean_pool(self.enc(q).float())[0], dim=0)

    @torch.no_grad()
    def encode(self, docs: List[Tuple[np.ndarray, list]]) -> List[torch.Tensor]:
        """docs [(ids (N,), spans)] -> per doc (P, H) float32 normalised passage vectors.
        Short documents are batched by length with per-sample lengths."""
        from .reading import passage_means

        out: List[Optional[torch.Tensor]] = [None] * len(docs)

        def finish(i, hidden):  # hidden (N, H) of doc i
            means = torch.cat([m for _, m in passage_means(hidden, docs[i][1])])
            out[i] = F.normalize(means, dim=-1).float().cpu()

        order = sorted(range(len(docs)), key=lambda i: -len(docs[i][0]))
        batch: List[int] = []
        for i in order + [None]:
            n = len(docs[i][0]) if i is not None else 0
            if batch and (i is None or (len(batch) + 1) * len(docs[batch[0]][0])
                          > self.batch_tokens):
                self._run_batch(batch, docs, finish)
                batch = []
            if i is None:
                break
            if n > self.long_tokens:
                x = torch.from_numpy(docs[i][0].astype(np.int64))[None].to(self.device)
                finish(i, self.enc.encode_long(x, window=self.window, global_tokens=1,
                                               chunk=self.chunk))
            else:
                batch.append(i)
        return out

    def _run_batch(self, batch, docs, finish):
        S = len(docs[batch[0]][0])  # the longest (sorted)
        x = torch.full((len(batch), S), self.pad, dtype=torch.long)
        for r, i in enumerate(batch):
            x[r, :len(docs[i][0])] = torch.from_numpy(docs[i][0].astype(np.int64))
        lens = torch.tensor([len(docs[i][0]) for i in batch], device=self.device)
        h = self.enc(x.to(self.device), lens, window=self.window, global_tokens=1)  # (B,S,H)
        for r, i in enumerate(batch):
            finish(i, h[r, :len(docs[i][0])])


# ------------------------------------------------------------------ storage


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then os.replace(tmp, path): readers see the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    _atomic_write(path, w)


def _write_shard(path: str, files: List[str], rows: List[Tuple[int, int, int, str]],
                 vectors: torch.Tensor) -> None:
    """rows [(file index, start, end, text)], vectors (P, H) float32."""
    from safetensors.torch import save_file

    blobs = [t.encode("utf-8") for *_, t in rows]
    off = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=off[1:])
    tensors = {
        "vectors": vectors.float().contiguous(),
        "file": torch.tensor([r[0] for r in rows], dtype=torch.int32),
        "start": torch.tensor([r[1] for r in rows], dtype=torch.int64),
        "end": torch.tensor([r[2] for r in rows], dtype=torch.int64),
        "text": torch.frombuffer(bytearray(b"".join(blobs) or b"\0"), dtype=torch.uint8),
        "text_off": torch.from_numpy(off),
    }
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
        "format": FORMAT, "version": str(VERSION), "files": json.dumps(files)}))


class Shard:
    def __init__(self, path: str):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                self.t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise BadIndexError(f"{path}: unreadable shard ({e})") from None
        if meta.get("format") != FORMAT or "files" not in meta:
            raise BadIndexError(f"{path}: not an mmcore index shard")
        self.files = json.loads(meta["files"])

    def text(self, r: int) -> str:
        o = self.t["text_off"]
        return bytes(self.t["text"][int(o[r]):int(o[r + 1])].numpy()).decode("utf-8")


class Index:
    """An index directory: manifest + shards.  `Index.open(path)` to read an existing one."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.m = os.fspath(path), manifest
        self._loaded = None
        self._encoder = None

    # ---- manifest
    @staticmethod
    def read_manifest(path: str) -> Optional[dict]:
        p = os.path.join(path, _MANIFEST)
        if not os.path.exists(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise BadIndexError(f"{p}: unreadable manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BadIndexError(f"{path}: not an mmcore index (no '{FORMAT}' manifest)")
        if m.get("version") != VERSION:
            raise BadIndexError(f"{path}: index format version {m.get('version')} (this mmcore "
                              f"reads version {VERSION}); rebuild it with `mmcore index`")
        return m

    @classmethod
    def open(cls, path) -> "Index":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise BadIndexError(f"{path}: no such index directory")
        m = cls.read_manifest(path)
        if m is None:
            raise BadIndexError(f"{path}: not an mmcore index (no {_MANIFEST})")
        return cls(path, m)

    def commit(self) -> None:
        _write_json(os.path.join(self.path, _MANIFEST), self.m)

    def shard_path(self, name: str) -> str:
        return os.path.join(self.path, _SHARDS, name)

    def __len__(self) -> int:
        return sum(f["passages"] for f in self.m["files"].values())

    # ---- search
    def _load(self):
        """vectors per shard (live rows only) and the row map: (shard, row) per result."""
        from .train.retrieval_index import RetrievalIndex

        ri = RetrievalIndex(self.m["dim"], normalize=False)
        rows: List[Tuple[Shard, np.ndarray]] = []
        for name in self.m["shards"]:
            sh = Shard(self.shard_path(name))
            live_f = np.array([self.m["files"].get(f, {}).get("shard") == name
                               for f in sh.files] or [False])
            live = np.nonzero(live_f[sh.t["file"].numpy()])[0]
            if len(live) == 0:
                continue
            v = sh.t["vectors"]
            ri.add(v if len(live) == v.shape[0] else v[torch.from_numpy(live)])
            rows.append((sh, live))
        self._loaded = (ri, rows)
        return self._loaded

    def encoder(self, model: Optional[str] = None) -> PassageEncoder:
        """The index's model (or `model`, which must have the same fingerprint)."""
        if self._encoder is None:
            m = model or self.m["model"]["path"]
            if not os.path.isdir(m):
                raise BadIndexError(f"{self.path}: its model {m} is not there; pass the same "
                                  f"model dir with --model")
            fp = model_fingerprint(m)
            if fp != self.m["model"]["fingerprint"]:
                raise BadIndexError(f"{self.path}: written by model {self.m['model']['path']} "
                                  f"(fingerprint {self.m['model']['fingerprint']}), not by {m} "
                                  f"({fp}); search it with the same model")
            w = self.m["window"]
            self._encoder = PassageEncoder(m, window=tuple(w) if w else None)
        return self._encoder

    def search(self, query: str, top_k: int = 5, model: Optional[str] = None) -> List[dict]:
        """The `top_k` passages most similar to `query`: [{rank, file, start, end, score,
        text}], best first."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        ri, rows = self._loaded or self._load()
        if len(ri) == 0:
            return []
        q = self.encoder(model).query(query)
        scores, idx = ri.search(q[None], k=top_k)
        bounds = np.cumsum([0] + [len(live) for _, live in rows])
        out = []
        for rank, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist())):
            c = int(np.searchsorted(bounds, i, side="right")) - 1
            sh, live = rows[c]
            r = int(live[i - bounds[c]])
            out.append(dict(rank=rank + 1, file=sh.files[int(sh.t["file"][r])],
                            start=int(sh.t["start"][r]), end=int(sh.t["end"][r]),
                            score=round(float(s), 4), text=sh.text(r)))
        return out


# ------------------------------------------------------------------ building


def _progress(enabled: bool, total_files: int):
    if not enabled:
        return None
    tqdm = optional("tqdm")  # a progress bar is a nicety: off without the train extra
    if tqdm is None:
        return None
    return tqdm.tqdm(total=0, unit="tok", unit_scale=True, desc=f"indexing {total_files} files",
                file=sys.stderr, dynamic_ncols=True, leave=False)


def index(folder, out, *, model: Optional[str] = None, window=(128, 128), device="cpu",
          dtype=torch.float32, chunk: int = 4096, batch_files: int = 256,
          batch_tokens: int = 65536, progress: bool = False, rebuild: bool = False,
          encoder: Optional[PassageEncoder] = None,
          _after_commit: Optional[Callable[[int], None]] = None) -> dict:
    """Index every text file under `folder` into the directory `out` (created, or updated:
    only new and changed files are encoded, deleted ones dropped).

    Files are committed in batches of at most `batch_files` files / `batch_tokens` tokens.
    Unreadable, empty, binary and non-UTF-8 files are skipped and reported.  An existing
    index of another model, window or folder is refused (BadIndexError) unless `rebuild`.
    Returns {files, encoded, unchanged, removed, skipped {path: reason}, passages, tokens,
    seconds, tokens_per_s, index}."""
    folder, out = os.fspath(folder), os.fspath(out)
    if not os.path.isdir(folder):
        raise BadIndexError(f"{folder}: no such directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadIndexError(f"{out}: exists and is not a directory")
    window = tuple(window) if window is not None else None
    t_start = time.perf_counter()
    pe = encoder or PassageEncoder(model, window=window, device=device, dtype=dtype,
                                   chunk=chunk)
    want = dict(format=FORMAT, version=VERSION, model=dict(
        path=pe.model, fingerprint=model_fingerprint(pe.model)), dim=pe.dim,
        window=list(window) if window else None, root=os.path.abspath(folder))
    m = Index.read_manifest(out) if os.path.isdir(out) else None
    if m is not None and not rebuild:
        for key, what in (("model", "model"), ("window", "window"), ("root", "folder")):
            a = m[key]["fingerprint"] if key == "model" else m[key]
            b = want[key]["fingerprint"] if key == "model" else want[key]
            if a != b:
                shown = m[key]["path"] if key == "model" else a
                raise BadIndexError(f"{out}: an index of another {what} ({shown}); use another "
                                  f"output directory or rebuild it (--rebuild)")
    if m is None or rebuild:
        m = dict(want, files={}, shards=[], next_shard=0)
    os.makedirs(os.path.join(out, _SHARDS), exist_ok=True)
    idx = Index(out, m)
    _clean_orphans(idx)

    scan = scan_folder(folder, exclude=(out,))
    skipped = dict(scan.skipped)
    todo: List[Tuple[str, str, str, int]] = []  # (rel, full, sha, size)
    present = set()
    for rel, full in scan.files:
        sha, size, why = _hash(full)
        if why is not None:
            skipped[rel] = why
            continue
        present.add(rel)
        old = m["files"].get(rel)
        if old is None or old["sha256"] != sha:
            todo.append((rel, full, sha, size))
    removed = [f for f in m["files"] if f not in present]
    for f in removed:
        del m["files"][f]
    if removed:
        idx.commit()
        _drop_dead_shards(idx)

    bar = _progress(progress, len(todo))
    done_tok = done_bytes = 0
    left_bytes = sum(t[3] for t in todo)
    encoded = commits = 0
    t_enc = time.perf_counter()
    i = 0
    while i < len(todo):
        batch, docs, ntok = [], [], 0
        while i < len(todo) and len(batch) < batch_files and (not batch or ntok < batch_tokens):
            rel, full, sha, size = todo[i]
            i += 1
            try:
                text, sha2, _ = read_text(full)
            except Skip as e:
                skipped[rel] = str(e)
                continue
            ids, spans = pe.tokenize(text)
            if not spans:
                skipped[rel] = "no text to index"
                m["files"].pop(rel, None)
                continue
            batch.append((rel, sha2, size, len(ids), text))
            docs.append((ids, spans))
            ntok += len(ids)
        if not batch:
            continue
        vecs = pe.encode(docs)
        name = f"{m['next_shard']:06d}.safetensors"
        files = [b[0] for b in batch]
        rows, vv = [], []
        for fi, ((rel, sha, size, n, text), (_, spans), v) in enumerate(zip(batch, docs, vecs)):
            rows += [(fi, c0, c1, text[c0:c1]) for _, _, c0, c1 in spans]
            vv.append(v)
        _write_shard(idx.shard_path(name), files, rows, torch.cat(vv))
        for (rel, sha, size, n, _), (_, spans) in zip(batch, docs):
            m["files"][rel] = dict(sha256=sha, size=size, tokens=int(n),
                                   passages=len(spans), shard=name)
        m["shards"].append(name)
        m["next_shard"] += 1
        idx.commit()
        _drop_dead_shards(idx)
        commits += 1
        encoded += len(batch)
        done_tok += ntok
        done_bytes += sum(b[2] for b in batch)
        left_bytes -= sum(b[2] for b in batch)
        if bar is not None:
            bar.total = done_tok + int(left_bytes * done_tok / max(done_bytes, 1))
            bar.set_postfix_str(f"files {encoded}/{len(todo)}")
            bar.update(ntok)
        if _after_commit is not None:
            _after_commit(commits)
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t_enc
    return dict(files=len(m["files"]), encoded=encoded, unchanged=len(present) - len(todo),
                removed=len(removed), skipped=skipped, passages=len(idx), tokens=done_tok,
                seconds=round(secs, 3), total_seconds=round(time.perf_counter() - t_start, 3),
                tokens_per_s=round(done_tok / secs, 1) if secs > 0 and done_tok else 0.0,
                index=out)


def _clean_orphans(idx: Index) -> None:
    """Shards (and temporary files) that no commit lists: left by a killed run."""
    d = os.path.join(idx.path, _SHARDS)
    keep = set(idx.m["shards"])
    for n in os.listdir(d):
        if n not in keep:
            os.remove(os.path.join(d, n))
    for n in os.listdir(idx.path):
        if ".tmp" in n:
            os.remove(os.path.join(idx.path, n))


def _drop_dead_shards(idx: Index) -> None:
    """Delete shards no file maps to any more, and rewrite those with fewer than half of
    their rows live (after the manifest commit that stops using the old file)."""
    m = idx.m
    used: Dict[str, int] = {}
    for f in m["files"].values():
        used[f["shard"]] = used.get(f["shard"], 0) + f["passages"]
    dead = [s for s in m["shards"] if s not in used]
    for name in [s for s in m["shards"] if s in used]:
        sh = Shard(idx.shard_path(name))
        if 2 * used[name] >= sh.t["vectors"].shape[0]:
            continue
        keep = [i for i, f in enumerate(sh.files) if m["files"].get(f, {}).get("shard") == name]
        remap = {old: new for new, old in enumerate(keep)}
        fi = sh.t["file"].tolist()
        rows = [r for r in range(len(fi)) if fi[r] in remap]
        new_name = f"{m['next_shard']:06d}.safetensors"
        m["next_shard"] += 1
        _write_shard(idx.shard_path(new_name), [sh.files[i] for i in keep],
                     [(remap[fi[r]], int(sh.t["start"][r]), int(sh.t["end"][r]), sh.text(r))
                      for r in rows], sh.t["vectors"][torch.tensor(rows, dtype=torch.long)])
        for i in keep:
            m["files"][sh.files[i]]["shard"] = new_name
        m["shards"][m["shards"].index(name)] = new_name
        dead.append(name)
    if not dead:
        return
    m["shards"] = [s for s in m["shards"] if s not in dead]
    idx.commit()
    for s in dead:
        try:
            os.remove(idx.shard_path(s))
        except FileNotFoundError:
            pass


def search(index_dir, query: str, top_k: int = 5, *, model: Optional[str] = None,
           encoder: Optional[PassageEncoder] = None) -> List[dict]:
    """The `top_k` passages of an index most similar to `query` (see Index.search).
    `encoder`: a PassageEncoder already loaded (the same model), to skip loading it."""
    idx = Index.open(index_dir)
    if encoder is not None:
        if model_fingerprint(encoder.model) != idx.m["model"]["fingerprint"]:
            raise BadIndexError(f"{index_dir}: written by model {idx.m['model']['path']}, not "
                                f"by the encoder's {encoder.model}")
        idx._encoder = encoder
    return idx.search(query, top_k, model=model)
