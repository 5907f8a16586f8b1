"""Attention heatmaps of a long-document read (`mmcore read --explain map.png`), from exact
attention rows recomputed with the saved log-sum-exp — never the (N × N) matrix.

    from mmcore.reading import read
    res = read(text, query, explain="map.png")      # res["explain"]: what was drawn
    # or, on an encoder you hold:
    from mmcore.explain import encoder_attention_rows
    p = encoder_attention_rows(enc, ids, rows=[0, 40, 41], window=(128, 128))  # (H, 3, N)

What is drawn: the last layer's attention of [CLS] (a global token: it sees the whole
document) and of the tokens of the best-ranked passage, averaged over heads — over the whole
document (binned), and zoomed on the passage ± the window.  With images fused by a
MultimodalReader: the passage tokens' co-attention over each image's patches (the first fusion
layer), drawn on the image.  The rows come from mmcore.ops.attention_maps: the layer's op runs
once with return_lse=True (O(N) extra), then only the chosen rows are recomputed
(O(rows × N)).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .ops import window_attention
from .ops.attention_maps import co_attention_rows, window_attention_rows

__all__ = ["encoder_attention_rows", "fusion_attention_rows", "explain_read",
           "save_attention_png"]


@torch.no_grad()
def encoder_attention_rows(enc, input_ids, rows: Sequence[int], *, layer: int = -1,
                           window=(128, 128), global_tokens: int = 1, chunk: int = 2048,
                           backend: str = "auto") -> torch.Tensor:
    """Exact attention probabilities of TextEncoder layer `layer` for the query rows `rows`
    of one long sequence.  input_ids (1, N) -> (heads, R, N) float32.

    The layers before `layer` run as in encode_long (chunked, O(N·window)); the layer's
    q, k, v (O(N·H)) go through window_attention once for the lse, then the rows."""
    L = len(enc.layers)
    if not -L <= layer < L:
        raise ValueError(f"layer must lie in [-{L}, {L}), got {layer}")
    li = layer % L
    x = enc.encode_long(input_ids, window=window, global_tokens=global_tokens, chunk=chunk,
                        layers=li)  # (N, H): the input of layer li
    a = enc.layers[li].attn
    N, H = x.shape
    qkv = torch.empty(3, 1, a.h, N, H // a.h, dtype=x.dtype, device=x.device)
    w = torch.cat([a.q.weight, a.k.weight, a.v.weight])  # (3H, H)
    b = torch.cat([a.q.bias, a.k.bias, a.v.bias])
    for i in range(0, N, chunk):
        y = F.linear(x[i:i + chunk], w, b)  # (c, 3H)
        qkv[:, 0, :, i:i + chunk] = y.view(-1, 3, a.h, H // a.h).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)  # (1, h, N, D) each
    _, lse = window_attention(q, k, v, window=window, global_tokens=global_tokens,
                              return_lse=True, backend=backend)
    return window_attention_rows(q, k, v, rows, window=window, global_tokens=global_tokens,
                                 lse=lse)[0].float()


@torch.no_grad()
def fusion_attention_rows(layer, h_t, h_v, text_rows: Sequence[int] = (),
                          image_rows: Sequence[int] = (), backend: str = "auto"):
    """Both directions of a CoAttention layer's attention for chosen rows.  h_t (1, St, d),
    h_v (1, Sv, d) -> (P_t (heads, Rt, Sv) text rows over image tokens, P_v (heads, Rv, St))."""
    q_t, k_t, v_t = layer._qkv(h_t)
    q_v, k_v, v_v = layer._qkv(h_v)
    p_t, p_v = co_attention_rows(q_t, k_t, v_t, q_v, k_v, v_v, text_rows=text_rows,
                                 image_rows=image_rows, scale=layer.scale, backend=backend)
    return p_t[0].float(), p_v[0].float()


def _bin(p: torch.Tensor, bins: int) -> torch.Tensor:
    """(R, N) -> (R, min(N, bins)): the attention mass of each run of ceil(N / bins) keys."""
    R, N = p.shape
    w = max(1, math.ceil(N / bins))
    pad = (-N) % w
    return F.pad(p, (0, pad)).view(R, -1, w).sum(-1)


def save_attention_png(path: str, doc_rows: torch.Tensor, row_labels: List[str],
                       tokens: List[str], focus=None, images=(), title: str = "",
                       bins: int = 1024) -> str:
    """The heatmap PNG.  doc_rows (R, N) attention over document tokens (head-averaged);
    focus (a, b): the key range of the zoomed panel; images: [(picture (h, w, 3) in [0, 1],
    grid (g, g) attention over its patches, title)]."""
    from ._optional import require

    require("matplotlib", feature="mmcore read --explain").use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    R, N = doc_rows.shape
    n_img = len(images)
    fig = plt.figure(figsize=(12, 3 + 0.12 * R + (3 if n_img else 0)))
    rows = 3 if n_img else 2
    gs = fig.add_gridspec(rows, max(1, n_img), height_ratios=[1, 1, 1.1][:rows])
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    ax = fig.add_subplot(gs[0, :])
    b = _bin(doc_rows, bins).clamp_min(1e-6)
    w = math.ceil(N / b.shape[1])
    im = ax.imshow(b.numpy(), aspect="auto", cmap="magma", norm=norm, interpolation="nearest",
                   extent=(0, b.shape[1] * w, R - 0.5, -0.5))
    ax.set_yticks(range(R), row_labels, fontsize=6)
    ax.set_xlabel(f"document token ({N:,} tokens; each column sums {w} keys)")
    ax.set_title(title or "attention over the document", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="attention")
    ax = fig.add_subplot(gs[1, :])
    a, e = focus if focus is not None else (0, min(N, 256))
    z = doc_rows[:, a:e].clamp_min(1e-6)
    ax.imshow(z.numpy(), aspect="auto", cmap="magma", norm=norm, interpolation="nearest",
              extent=(a - 0.5, e - 0.5, R - 0.5, -0.5))
    ax.set_yticks(range(R), row_labels, fontsize=6)
    step = max(1, (e - a) // 40)
    ticks = list(range(a, e, step))
    ax.set_xticks(ticks, [tokens[t] for t in ticks], rotation=90, fontsize=6)
    ax.set_title(f"zoom: tokens {a}..{e - 1}", fontsize=9)
    for i, (pic, grid, name) in enumerate(images):
        ax = fig.add_subplot(gs[2, i])
        ax.imshow(pic, interpolation="nearest")
        h, wd = pic.shape[:2]
        ax.imshow(grid.numpy(), cmap="jet", alpha=0.45, extent=(-0.5, wd - 0.5, h - 0.5, -0.5),
                  interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    try:  # the format is explicit: the file written is exactly `path`, never path + ".png"
        fig.savefig(path, dpi=110, format=explain_format(path))
    finally:
        plt.close(fig)
    return path


EXPLAIN_FORMATS = ("png", "pdf", "svg")


def explain_format(path: str) -> str:
    """The image format of an --explain path: its extension (png, pdf or svg), or png for a
    name without one; ValueError for anything else."""
    import os

    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not ext:
        return "png"
    if ext not in EXPLAIN_FORMATS:
        raise ValueError(f"--explain {path}: unsupported image type .{ext} (use .png, .pdf or "
                         f".svg)")
    return ext


def check_explain_path(path: str) -> str:
    """An --explain target that can be written as given: not empty, not a directory or a
    device / pipe, a supported extension, in an existing writable directory.  -> path;
    ValueError naming the path otherwise.  Nothing is written here."""
    import os
    import stat

    if not isinstance(path, str) or not path.strip():
        raise ValueError("--explain: empty path (give the image file to write, e.g. map.png)")
    explain_format(path)
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"--explain {path}: is a directory; give a file name, e.g. "
                         f"{os.path.join(path, 'map.png')}")
    if os.path.lexists(path):
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"--explain {path}: exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise ValueError(f"--explain {path}: not writable")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--explain {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--explain {path}: directory {parent} is not writable")
    return path


def _passage_rows(span, max_rows: int) -> List[int]:
    t0, t1 = span
    n = t1 - t0
    if n <= max_rows:
        return list(range(t0, t1))
    return sorted({t0 + round(i * (n - 1) / (max_rows - 1)) for i in range(max_rows)})


@torch.no_grad()
def explain_read(out_png: str, *, enc, tokenizer, ids: List[int], span, window,
                 chunk: int = 2048, layer: int = -1, max_rows: int = 48, reader=None,
                 hidden=None, image_hidden=None, pixels=None, image_names=(),
                 patch_tokens: Optional[int] = None) -> dict:
    """Draw the read's attention map to `out_png`.  ids: the document's token ids; span:
    (t0, t1) token range of the best passage; hidden (N, d): the text states that enter
    fusion, image_hidden (1, M·T, d) the projected image tokens (both only with a fusing
    reader), pixels (M, 3, R, R) CLIP-normalised, patch_tokens T (1 + P).
    Returns {"png", "layer", "rows", "row_tokens", "images"}."""
    from .models.vision_encoder import CLIP_MEAN, CLIP_STD

    device = enc.word.weight.device
    x = torch.tensor([ids], device=device)
    rows = [0] + [r for r in _passage_rows(span, max_rows) if r != 0]
    p = encoder_attention_rows(enc, x, rows, layer=layer, window=window, chunk=chunk)
    doc = p.mean(0).cpu()  # (R, N) head-averaged
    toks = [tokenizer.tok.id_to_token(i) or "?" for i in ids]
    labels = [f"{toks[r]} @{r}" for r in rows]
    left = window[0] if window else 64
    right = window[1] if window else 64
    focus = (max(0, span[0] - left - 8), min(len(ids), span[1] + right + 8))
    images, info = [], []
    if reader is not None and image_hidden is not None and len(reader.heads["fusion"]):
        text_rows = rows[1:] or rows
        p_t, _ = fusion_attention_rows(reader.heads["fusion"][0], hidden[None], image_hidden,
                                       text_rows)
        per = p_t.mean((0, 1)).cpu()  # (M·T,) attention mass per image token
        T = patch_tokens
        g = int(round(math.sqrt(T - 1)))
        m = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        s = torch.tensor(CLIP_STD).view(3, 1, 1)
        for i in range(per.numel() // T):
            tok = per[i * T:(i + 1) * T]
            pic = (pixels[i].cpu().float() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
            name = os.path.basename(str(image_names[i])) if i < len(image_names) else \
                f"image {i}"
            images.append((pic, tok[1:].view(g, g), f"{name}\n(CLS {float(tok[0]):.2f}, "
                                                     f"patches {float(tok[1:].sum()):.2f})"))
            info.append(dict(image=name, cls=float(tok[0]), patches=float(tok[1:].sum())))
    L = len(enc.layers)
    save_attention_png(out_png, doc, labels, toks, focus, images,
                       title=f"layer {layer % L + 1}/{L} attention (mean over heads) of [CLS] "
                             f"and the best passage's tokens, window {window}")
    return {"png": out_png, "layer": layer % L, "rows": rows, "row_tokens": [toks[r] for r in rows],
            "images": info}
