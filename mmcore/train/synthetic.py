"""The embedded default's data: a generated, seeded long-document classification set.

Each document is filler prose about a harbour archive (label-independent, drawn from a seeded
generator) with ONE deciding sentence — the board granting or refusing a request — placed
past token `decide_after` (512 by default).  A reader that sees only the first 512 tokens has
nothing to go on (chance, 50 %); a reader of the whole document can find the sentence.

    from mmcore.train.synthetic import long_document_splits
    splits = long_document_splits(seed=0)   # {"train": [...], "validation": [...], "test": [...]}
    splits["train"][0]  # {"text": ..., "label": "granted", "decide_token": 587, "tokens": 655}
"""
from __future__ import annotations

import random
from typing import Optional

LABELS = ("granted", "refused")

_SLOTS = dict(
    ship=["Heron", "Maria Vos", "North Star", "Tern", "Brightwater", "Saint Olave", "Kestrel",
          "Morning Tide", "Grey Gull", "Providence"],
    cargo=["timber", "salt cod", "coal", "linen", "tea chests", "wine casks", "iron nails",
           "rope", "tobacco", "wool bales"],
    port=["Leith", "Bergen", "Danzig", "Riga", "Hull", "Bordeaux", "Cadiz", "Lisbon", "Rotterdam",
          "Antwerp"],
    clerk=["Mr Hale", "Mrs Orton", "the harbour clerk", "the night watchman", "the pilot",
           "the customs officer", "Captain Rowe", "the archivist"],
    room=["east reading room", "map cabinet", "ledger vault", "old chart room", "upper gallery",
          "tide office"],
    weather=["a westerly gale", "thick sea fog", "a calm grey swell", "sleet from the north",
             "a warm south wind", "heavy autumn rain"],
    weekday=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
)
_FILLER = [
    "The {ship} arrived from {port} with a hold of {cargo} in {year}.",
    "{clerk} copied the manifest of the {ship} into the ledger on {weekday}.",
    "Most of the {cargo} was stored in the warehouse behind the {room}.",
    "In {year} {weather} kept the fishing boats in the harbour for a week.",
    "The records of the {room} list every vessel that sailed for {port}.",
    "{clerk} noted that the {ship} needed new sails before the winter.",
    "A chart of the coast near {port} hangs above the desk in the {room}.",
    "The tide tables for {year} were bound in red leather by {clerk}.",
    "Letters from merchants in {port} describe the price of {cargo} that spring.",
    "On {weekday} mornings {clerk} opens the {room} to visiting scholars.",
    "The {ship} was delayed at {port} by {weather} and a broken rudder.",
    "Pages about the {cargo} trade of {year} are kept in the {room}.",
]
_DECIDING = {
    "granted": [
        "After a long hearing the harbour board granted the request of the {ship} in full.",
        "In the end the harbour board approved the application of the {ship} without conditions.",
        "The harbour board finally accepted the petition of the {ship} and gave its consent.",
        "When the vote was counted the harbour board agreed to the request of the {ship}.",
    ],
    "refused": [
        "After a long hearing the harbour board refused the request of the {ship} outright.",
        "In the end the harbour board rejected the application of the {ship} without appeal.",
        "The harbour board finally denied the petition of the {ship} and withheld its consent.",
        "When the vote was counted the harbour board turned down the request of the {ship}.",
    ],
}


def _fill(rng: random.Random, template: str) -> str:
    w = {k: rng.choice(v) for k, v in _SLOTS.items()}
    w["year"] = rng.randint(1780, 1910)
    s = template.format(**w)
    return s[0].upper() + s[1:]


def long_document(rng: random.Random, label: str, count, *, tokens=(560, 760),
                  decide_after: int = 512) -> dict:
    """One document: ~tokens[0]..tokens[1] tokens (with [CLS]/[SEP]) of filler, the deciding
    sentence for `label` starting at a token index in (decide_after, length - 24].

    count: list[str] -> list[int] token counts (the model's tokenizer, no special tokens)."""
    if label not in _DECIDING:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    target = rng.randint(*tokens)
    lo = decide_after + 8
    if target < lo + 32:
        raise ValueError(f"tokens {tokens}: a document needs >= decide_after + 40 = "
                         f"{decide_after + 40} tokens")
    at = rng.randint(lo, target - 32)  # the deciding sentence starts at or after this token
    deciding = _fill(rng, rng.choice(_DECIDING[label]))
    pool = [_fill(rng, rng.choice(_FILLER)) for _ in range(target // 8)]
    sizes = count(pool)
    sents, pos, placed, decide_token = [], 1, False, None  # pos: next token index ([CLS] = 0)
    for s, n in zip(pool, sizes):
        if not placed and pos >= at:
            sents.append(deciding)
            decide_token = pos
            pos += count([deciding])[0]
            placed = True
        if pos + n + 1 > target:
            break
        sents.append(s)
        pos += n
    if not placed:
        sents.append(deciding)
        decide_token = pos
        pos += count([deciding])[0]
    return {"text": " ".join(sents), "label": label, "decide_token": decide_token,
            "tokens": pos + 1}


def long_document_splits(n_train: int = 96, n_val: int = 32, n_test: int = 96, seed: int = 0,
                         tokens=(560, 760), decide_after: int = 512,
                         model_dir: Optional[str] = None) -> dict:
    """{"train", "validation", "test"} lists of records {text, label, decide_token, tokens},
    labels balanced within each split and shuffled, all from `seed`."""
    from ..models import default_text_model
    from ..reading import load_tokenizer

    tok = load_tokenizer(model_dir or default_text_model())
    rng = random.Random(seed)
    out = {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        labels = [LABELS[i % len(LABELS)] for i in range(n)]
        rng.shuffle(labels)
        out[split] = [long_document(rng, y, tok.count, tokens=tokens, decide_after=decide_after)
                      for y in labels]
    return out


def write_jsonl(out_dir: str, sizes=(96, 32, 96), seed: int = 0, tokens=(560, 660)) -> dict:
    """The generated set as <out_dir>/{train,validation,test}.jsonl -> {split: path}."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, recs in long_document_splits(*sizes, seed=seed, tokens=tokens).items():
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmcore.train.synthetic",
                                 description="write the generated long-document set as JSONL")
    ap.add_argument("out_dir")
    ap.add_argument("--sizes", default="96,32,96", help="train,validation,test documents")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        sizes = tuple(int(x) for x in a.sizes.split(","))
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--sizes must be three positive ints, got {a.sizes!r}")
    for split, p in write_jsonl(a.out_dir, sizes, a.seed).items():
        print(f"{split}: {p}")
