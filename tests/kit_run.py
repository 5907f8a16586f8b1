"""Helpers of the run-directory tests (load_run, mmcore predict / export): tiny base models in
Hugging Face key names (BERT and RoBERTa shapes, random weights, MiniLM's tokenizer), and
labelled documents whose label is one keyword anywhere in the text."""
import json
import os
import random
import shutil

import torch

WORDS = ("river stone market lantern winter harbour garden copper meadow engine paper "
         "window forest silver morning village").split()


def hf_base(path, family="bert", hidden=32, layers=2, heads=2, seed=0):
    """config.json + model.safetensors (BertModel / RobertaModel / XLMRobertaModel keys:
    AutoModel loads it; family "bert" | "roberta" | "xlm-roberta") +
    the MiniLM tokenizer files -> path."""
    from safetensors.torch import save_file

    from mmcore.models import TextConfig, TextEncoder, default_text_model
    from mmcore.models.text_encoder import hf_name

    os.makedirs(path, exist_ok=True)
    roberta = family in ("roberta", "xlm-roberta")
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
    cfg = dict(model_type=family, vocab_size=30522, hidden_size=hidden,
               num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=2 * hidden, hidden_act="gelu",
               max_position_embeddings=130 if roberta else 128,
               type_vocab_size=1 if roberta else 2,
               layer_norm_eps=1e-5 if roberta else 1e-12, pad_token_id=1 if roberta else 0,
               architectures=[arch[family]])
    torch.manual_seed(seed)
    enc = TextEncoder(TextConfig.from_dict(cfg), pooler=True)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            elif n.endswith("bias"):
                p.normal_(0, 0.02)
    save_file({hf_name(k): v.contiguous() for k, v in enc.state_dict().items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    src = default_text_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), path)
    return str(path)


def documents(n, seed=0, words=(6, 40), labels=("approved", "refused"),
              keys=("good", "bad")):
    """[{"id", "text", "label"}]: random filler words with one keyword deciding the label."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 2
        w = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        w.insert(rng.randrange(len(w) + 1), keys[k])
        out.append({"id": f"doc-{seed}-{i}", "text": " ".join(w), "label": labels[k]})
    return out


def write_jsonl(path, records, drop=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k not in drop}) + "\n")
    return str(path)
