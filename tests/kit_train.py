"""Helpers of the trainer tests: a tiny BERT checkpoint dir (random weights, HF key names,
safetensors) with the real MiniLM tokenizer, and a small labelled JSONL data set."""
import json
import os
import random
import shutil

import torch


def tiny_model_dir(path, hidden=32, layers=2, heads=2, seed=0):
    """config.json + model.safetensors (BertModel keys) + tokenizer.json -> path."""
    from safetensors.torch import save_file

    from mmcore.models import TextConfig, TextEncoder, default_text_model

    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type="bert", vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=heads, intermediate_size=2 * hidden, hidden_act="gelu",
               max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
               pad_token_id=0)
    torch.manual_seed(seed)
    enc = TextEncoder(TextConfig.from_dict(cfg), pooler=False)
    for n, p in enc.named_parameters():
        with torch.no_grad():
            if n.endswith("weight") and p.dim() == 2:
                p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    shutil.copy(os.path.join(default_text_model(), "tokenizer.json"), path)
    return str(path)


_WORDS = ("river stone market lantern winter harbour garden copper meadow engine paper "
          "window forest silver morning village").split()


def labelled_jsonl(path, n, seed=0, min_words=6, max_words=40):
    """Records whose label ("pos" / "neg") is decided by one keyword ("good" / "bad") among
    random filler words; lengths vary, so batches need padding."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            lab = "pos" if i % 2 == 0 else "neg"
            words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
            words.insert(rng.randrange(len(words) + 1), "good" if lab == "pos" else "bad")
            f.write(json.dumps({"text": " ".join(words), "label": lab}) + "\n")
    return str(path)
