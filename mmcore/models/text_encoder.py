"""TextEncoder: BERT / RoBERTa / MiniLM encoders on mmcore.ops.window_attention.

Loads a Hugging Face checkpoint dir (BertModel / RobertaModel keys, with or without the
``bert.`` / ``roberta.`` prefix of the task models).  Long-document mode (Longformer recipe):
``window=(w, w)`` local attention, a global prefix (CLS / query tokens) that sees and is seen
by every token, and positions past the learned table wrap onto it — the same as extending the
position table by copying the learned one, without materialising the copy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import window_attention
from .loading import Checkpoint, load_into, read_config

_ACT = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclass
class TextConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_act not in _ACT:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} not supported (have {sorted(_ACT)})")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cfg

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type in ("roberta", "xlm-roberta") else 0


class SelfAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        H = c.hidden_size
        self.h = c.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x, lengths, window, global_tokens):
        B, S, H = x.shape  # x (B, S, H)
        q, k, v = (p(x).view(B, S, self.h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = window_attention(q, k, v, window=window, global_tokens=global_tokens,
                             seqlens_q=lengths, seqlens_k=lengths)  # (B, h, S, D)
        return self.o(a.transpose(1, 2).reshape(B, S, H))


class Layer(nn.Module):
    """Post-LN BERT layer: x = LN(x + attn(x)); x = LN(x + W2 act(W1 x))."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.attn = SelfAttention(c)
        self.ln1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ff1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ff2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.ln2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.act = _ACT[c.hidden_act]

    def forward(self, x, lengths=None, window=None, global_tokens=0):
        x = self.ln1(x + self.attn(x, lengths, window, global_tokens))
        return self.ffn(x)

    def ffn(self, x):
        return self.ln2(x + self.ff2(self.act(self.ff1(x))))


class TextEncoder(nn.Module):
    """BERT-family encoder.  forward(input_ids (B, S), lengths (B,) | None, ...) ->
    hidden (B, S, H) (rows past a sample's length are padding, not meaningful)."""

    def __init__(self, config: TextConfig, pooler: bool = True):
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        self.word = nn.Embedding(c.vocab_size, H)
        self.pos = nn.Embedding(c.max_position_embeddings, H)
        self.ttype = nn.Embedding(c.type_vocab_size, H)
        self.ln = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(H, H) if pooler else None

    # -------------------------------------------------------------- positions
    def position_ids(self, S: int, device, start: int = 0) -> torch.Tensor:
        """(S,) ids of absolute positions start..start+S-1; past the learned table they wrap
        onto it (Longformer: the extended table is copies of the learned one)."""
        off = self.config.position_offset
        n = self.config.max_position_embeddings - off  # learned positions
        p = torch.arange(start, start + S, device=device)
        return off + p % n

    def embed(self, input_ids, start: int = 0, token_type_ids=None):
        S = input_ids.shape[1]
        x = self.word(input_ids) + self.pos(self.position_ids(S, input_ids.device, start))
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        return self.ln(x + self.ttype(tt))  # (B, S, H)

    def forward(self, input_ids, lengths=None, *, window=None, global_tokens=0,
                token_type_ids=None):
        """window=None: full attention (as BertModel); window=(w, w): long-document mode,
        with `global_tokens` prefix tokens (CLS / query) attending everywhere."""
        x = self.embed(input_ids, token_type_ids=token_type_ids)
        for layer in self.layers:
            x = layer(x, lengths, window, global_tokens)
        return x

    def pool(self, hidden):
        """BertModel's pooler_output: tanh(W h[:, 0])."""
        if self.pooler is None:
            raise RuntimeError("this TextEncoder was built without a pooler")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @torch.no_grad()
    def encode_long(self, input_ids, *, window=(128, 128), global_tokens=1, chunk=4096,
                    progress=None, layers=None, store_dtype=None):
        """Inference over one long sequence (1, N), layer by layer and chunk by chunk, with
        memory bounded by one copy of the hidden states.

        The hidden state x (N, H) is the only full-length tensor (kept in `store_dtype`,
        default the model's dtype; every chunk is computed in the model's dtype).  Per layer,
        chunk [a, b) of the non-global tokens is projected with its halo [a - left, b + right)
        (the keys its window reaches) and attends, through window_attention, over the global
        prefix + halo: q, k, v, scores and FFN activations exist only for one chunk + halo.
        The global prefix's query rows see every key: they are accumulated over the chunks'
        keys with an online softmax (outputs merged by their lse, return_lse=True) and written
        at the end of the layer.  The halo rows left of the chunk come from a carry of the
        previous chunk's layer input, so x is updated in place.

        `progress(n)` is called after each chunk of each layer with n = chunk tokens / layers
        (the calls add up to N).  `layers`: run only the first `layers` layers (the hidden
        state entering layer `layers`).  Returns x (N, H)."""
        assert input_ids.dim() == 2 and input_ids.shape[0] == 1, "encode_long takes (1, N)"
        N = input_ids.shape[1]
        L = len(self.layers)
        cdt = self.word.weight.dtype
        sdt = store_dtype or cdt
        H = self.config.hidden_size
        x = torch.empty(N, H, dtype=sdt, device=input_ids.device)  # (N, H)
        for i in range(0, N, chunk):
            x[i:i + chunk] = self.embed(input_ids[:, i:i + chunk], start=i)[0]
        G = min(int(global_tokens), N)
        lw, rw = (-1, -1) if window is None else (int(window[0]), int(window[1]))
        lw = N if lw < 0 else min(lw, N)
        rw = N if rw < 0 else min(rw, N)
        if lw + rw >= N:  # the window covers everything: one chunk, no halo to cut
            chunk = max(N - G, 1)
        for layer in self.layers[:layers]:
            self._long_layer(layer, x, G, lw, rw, chunk, progress, L)
        return x

    def _long_layer(self, layer, x, G, lw, rw, chunk, progress, L):
        """One layer of encode_long over x (N, H) in place (see there)."""
        N, H = x.shape
        a_ = layer.attn
        h = a_.h
        D = H // h
        cdt = self.word.weight.dtype
        w_qkv = torch.cat([a_.q.weight, a_.k.weight, a_.v.weight])  # (3H, H)
        b_qkv = torch.cat([a_.q.bias, a_.k.bias, a_.v.bias])

        def qkv(rows):  # (n, H) -> q, k, v (1, h, n, D)
            y = F.linear(rows, w_qkv, b_qkv).view(rows.shape[0], 3, h, D)
            return y.permute(1, 2, 0, 3).unsqueeze(1).unbind(0)

        xg = x[:G].to(cdt)  # (G, H) the global rows' layer input
        qg, kg, vg = qkv(xg)  # (1, h, G, D)
        og = lg = None  # running output (1, h, G, D) and lse (1, h, G) of the global rows
        if G:
            og, lg = window_attention(qg, kg, vg, return_lse=True)
        carry = x[G:G].to(cdt)  # layer-input rows left of the chunk (already overwritten)
        for a in range(G, N, chunk):
            b = min(N, a + chunk)
            lo, hi = max(G, a - lw), min(N, b + rw)
            xs = torch.cat([carry[carry.shape[0] - (a - lo):], x[a:hi].to(cdt)])  # [lo, hi)
            q, k, v = qkv(xs)  # (1, h, hi - lo, D)
            if G:  # local sequence: global prefix + halo; the global rows are dropped below
                q, k, v = (torch.cat([g, t], 2) for g, t in ((qg, q), (kg, k), (vg, v)))
            att = window_attention(q, k, v, window=(lw, rw), global_tokens=G)
            off = G + a - lo
            att = att[0, :, off:off + b - a].transpose(0, 1).reshape(b - a, H)  # (c, H)
            if G:  # the global rows over this chunk's own keys, merged by lse
                oc, lc = window_attention(qg, k[:, :, off:off + b - a],
                                          v[:, :, off:off + b - a], return_lse=True)
                m = torch.logaddexp(lg, lc)
                og = og * torch.exp(lg - m)[..., None] + oc * torch.exp(lc - m)[..., None]
                lg = m
            carry = xs[max(0, xs.shape[0] - (hi - b) - lw):xs.shape[0] - (hi - b)]
            xi = layer.ln1(xs[a - lo:b - lo] + a_.o(att))
            x[a:b] = layer.ffn(xi)
            if progress is not None:
                progress((b - a) / L)
        if G:
            o = og[0].transpose(0, 1).reshape(G, H)
            x[:G] = layer.ffn(layer.ln1(xg + a_.o(o)))
            if progress is not None:
                progress(G / L)

    # -------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, device="cpu", pooler=None):
        """Load a BERT / RoBERTa / MiniLM dir (config.json + safetensors).  pooler=None keeps
        the pooler iff the checkpoint has one."""
        cfg = TextConfig.from_dict(read_config(model_dir))
        ckpt = Checkpoint(model_dir)
        has_pooler = any(_map_key(k) == "pooler.weight" for k in ckpt.keys())
        with torch.device("meta"):
            model = cls(cfg, pooler=has_pooler if pooler is None else pooler)
        drop_pooler = has_pooler and model.pooler is None
        load_into(model, ckpt, key_map=lambda k: _map_key(k, drop_pooler), dtype=dtype,
                  device=device)
        return model.eval()


_RULES = [(re.compile(p), r) for p, r in [
    (r"^embeddings\.word_embeddings\.", "word."),
    (r"^embeddings\.position_embeddings\.", "pos."),
    (r"^embeddings\.token_type_embeddings\.", "ttype."),
    (r"^embeddings\.LayerNorm\.", "ln."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
     lambda m: f"layers.{m[1]}.attn.{m[2][0]}."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.o."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.ln1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ff1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ff2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ln2."),
    (r"^pooler\.dense\.", "pooler."),
]]
_DROP = re.compile(r"^(embeddings\.position_ids|cls\.|lm_head\.|classifier\.|qa_outputs\.)")


def _map_key(k: str, drop_pooler: bool = False) -> Optional[str]:
    """HF BertModel / RobertaModel key -> TextEncoder key (None = not part of the encoder)."""
    k = re.sub(r"^(bert|roberta|model)\.", "", k)
    if _DROP.match(k) or (drop_pooler and k.startswith("pooler.")):
        return None
    for pat, rep in _RULES:
        new, n = pat.subn(rep, k)
        if n:
            return new
    return k  # unknown: kept, so strict loading reports it as unexpected


def mean_pool(hidden, lengths=None):
    """(B, S, H) -> (B, H) mean over the valid tokens."""
    if lengths is None:
        return hidden.mean(1)
    m = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None])
    m = m.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


__all__ = ["TextConfig", "TextEncoder", "mean_pool"]


_HF_NAMES = [(re.compile(p), r) for p, r in [
    (r"^word\.", "embeddings.word_embeddings."),
    (r"^pos\.", "embeddings.position_embeddings."),
    (r"^ttype\.", "embeddings.token_type_embeddings."),
    (r"^ln\.", "embeddings.LayerNorm."),
    (r"^layers\.(\d+)\.attn\.([qkv])\.",
     lambda m: f"encoder.layer.{m[1]}.attention.self."
               f"{ {'q': 'query', 'k': 'key', 'v': 'value'}[m[2]]}."),
    (r"^layers\.(\d+)\.attn\.o\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.ln1\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^layers\.(\d+)\.ff1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.ff2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.ln2\.", r"encoder.layer.\1.output.LayerNorm."),
    (r"^pooler\.", "pooler.dense."),
]]


def hf_name(k: str) -> str:
    """TextEncoder parameter / module name -> the Hugging Face BertModel / RobertaModel name
    (the inverse of _map_key): ``layers.3.attn.q.lora_A.default.weight`` ->
    ``encoder.layer.3.attention.self.query.lora_A.default.weight``; a module path works too
    (``layers.3.attn.q`` -> ``encoder.layer.3.attention.self.query``)."""
    for pat, rep in _HF_NAMES:
        new, n = pat.subn(rep, k + ".")
        if n:
            return new[:-1]
    raise ValueError(f"{k!r} is not a TextEncoder parameter or module name")
