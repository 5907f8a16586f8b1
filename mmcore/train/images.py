"""Image data for the multimodal tasks: the user format (an image folder + a JSONL file of
captions / questions), pixel loading, and the offline set built from real images that ship
inside a PyPI package — scikit-learn's 1,797 handwritten digits (8 × 8, upsampled).

User format — one JSON object a line, image paths relative to the JSONL file's folder:

    photos/
      0001.png  0002.jpg  ...
    captions.jsonl
      {"images": "photos/0001.png", "text": "a dog running on a beach"}
      {"images": "photos/0002.jpg", "text": "two cups of coffee", "label": "food"}
      {"images": "photos/0003.png", "text": "what colour is the car?", "label": "red"}   (vqa)

`text` is the caption (matching / retrieval), the question (vqa) or the document
(doc_figures); `label` is optional for retrieval (a class: any image of the class answers a
caption of it; without it each caption's own image is the answer) and the answer / class for
vqa and doc_figures.  Pass the file as --train-file (and --val-file / --test-file); a folder
holding captions.jsonl works too (`records_from_folder`).

    from mmcore.train.images import digits_records, write_digits_folder
    splits = digits_records("captions", seed=0)    # {"train", "validation", "test"} records
    write_digits_folder("digits/")                 # the same images as PNGs + captions.jsonl
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.vision_encoder import CLIP_MEAN, CLIP_STD, preprocess

__all__ = ["DIGIT_WORDS", "ANSWERS", "caption", "question", "load_digits", "digits_records",
           "write_digits_folder", "records_from_folder", "load_pixels", "check_image",
           "IMAGE_SIZE"]

IMAGE_SIZE = 32  # 8 × 8 digits upsampled 4× (bilinear)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = DIGIT_WORDS + ("even", "odd", "yes", "no")  # every answer of question()
_CAPTIONS = ("a photo of the digit {w}", "a handwritten {w}", "the number {w}, written by hand",
             "an image of a handwritten {d}", "a scanned digit: {w}",
             "someone wrote the digit {w}")


def caption(digit: int, rng: random.Random) -> str:
    """A class-level caption of a digit (one of a few templates, word or numeral)."""
    return rng.choice(_CAPTIONS).format(w=DIGIT_WORDS[digit], d=digit)


def question(digit: int, rng: random.Random):
    """A question about a digit image and its answer (from a 14-word answer set: the ten
    digit words, even / odd, yes / no)."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(["what digit is this?", "which number is written here?",
                           "what number does the image show?"]), DIGIT_WORDS[digit]
    if kind == 1:
        return "is the digit even or odd?", ("even" if digit % 2 == 0 else "odd")
    if kind == 2:
        t = rng.randrange(1, 9)
        return f"is this digit larger than {DIGIT_WORDS[t]}?", ("yes" if digit > t else "no")
    shown = digit if rng.random() < 0.5 else rng.choice([d for d in range(10) if d != digit])
    return f"is this a {DIGIT_WORDS[shown]}?", ("yes" if shown == digit else "no")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [0, 1] -> CLIP-normalised, the same as preprocess() gives for files."""
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - m) / s


def _digits_01(image_size: int):
    """The digits as (N, 3, R, R) grey RGB in [0, 1] and their classes (N,)."""
    from .._optional import require

    load_digits = require("sklearn.datasets", feature="loading the digits images").load_digits
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target).long()


def load_digits(image_size: int = IMAGE_SIZE):
    """-> pixels (1797, 3, R, R) float32 CLIP-normalised, digits (1797,) int64."""
    x, y = _digits_01(image_size)
    return _normalise(x), y


def _split_order(n: int, seed: int, n_test: int = 360, n_val: int = 180):
    """Seeded permutation cut into test (360 of the 1,797 digits), validation (180) and
    train (the other 1,257)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return {"test": idx[:n_test], "validation": idx[n_test:n_test + n_val],
            "train": idx[n_test + n_val:]}


def digits_records(kind: str = "captions", *, seed: int = 0, image_size: int = IMAGE_SIZE,
                   sizes: Optional[Sequence[int]] = None) -> Dict[str, List[dict]]:
    """The digits as train / validation / test records (a seeded 1257 / 180 / 360 split;
    test images are never seen in training).

    kind="captions": {"text": caption, "label": "7", "pixels" (3, R, R), "digit": 7}
    kind="questions": {"text": question, "label": answer word, "pixels", "digit"}
    sizes: (n_train, n_val, n_test) to take fewer (tests)."""
    if kind not in ("captions", "questions"):
        raise ValueError(f"kind must be 'captions' or 'questions', got {kind!r}")
    pixels, digits = load_digits(image_size)
    order = _split_order(len(digits), seed)
    rng = random.Random(seed + 1)
    out = {}
    for i, split in enumerate(("train", "validation", "test")):
        idx = order[split] if sizes is None else order[split][:sizes[i]]
        recs = []
        for j in idx:
            d = int(digits[j])
            if kind == "captions":
                text, label = caption(d, rng), str(d)
            else:
                text, label = question(d, rng)
            recs.append({"text": text, "label": label, "pixels": pixels[j], "digit": d,
                         "image_id": j})
        out[split] = recs
    return out


def write_digits_folder(out_dir: str, *, seed: int = 0, image_size: int = IMAGE_SIZE,
                        kind: str = "captions", limit: Optional[int] = None) -> Dict[str, str]:
    """Write the digits in the user format: out_dir/images/NNNN.png + train.jsonl,
    validation.jsonl, test.jsonl (the same split and texts as digits_records).
    Returns {split: jsonl path}."""
    from .._optional import require

    Image = require("PIL.Image", feature="writing the digits images")
    x, y = _digits_01(image_size)
    splits = digits_records(kind, seed=seed, image_size=image_size)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {}
    for split, recs in splits.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for r in recs[:limit]:
                j = r["image_id"]
                rel = f"images/{j:04d}.png"
                a = (x[j, 0] * 255).round().to(torch.uint8).numpy()
                Image.fromarray(a, mode="L").save(os.path.join(out_dir, rel))
                f.write(json.dumps({"images": rel, "text": r["text"], "label": r["label"]})
                        + "\n")
        paths[split] = path
    return paths


def records_from_folder(folder: str, name: str = "captions.jsonl", **kw) -> List[dict]:
    """The records of folder/captions.jsonl (paths resolved against the folder)."""
    from .data import read_records

    path = os.path.join(folder, name) if os.path.isdir(folder) else folder
    return read_records(path, **kw)


def check_image(path: str, where: str = "") -> None:
    """Open the image's header and verify its data (no decoding into memory); a file that is
    not an image, a truncated / corrupt one, or a decompression bomb (more pixels than
    PIL.Image.MAX_IMAGE_PIXELS) is a ValueError naming the record and the file."""
    import warnings

    from .._optional import require

    Image = require("PIL.Image", feature="training on images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and w * h > limit:
                    raise ValueError(f"{w} x {h} pixels is over the {limit:,} pixel limit "
                                     f"(a decompression bomb?)")
                im.verify()
    except ValueError as e:
        raise ValueError(f"{where}: image {path}: {e}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as e:
        raise ValueError(f"{where}: image {path} is not a readable image "
                         f"({type(e).__name__}: {e})") from None


def load_pixels(images: Sequence[dict], image_size: int) -> torch.Tensor:
    """Images -> (B, 3, R, R): each {"pixels": (3, R, R)} already, or {"image": path} read
    with CLIP preprocessing (RGB, resize, centre crop, normalise)."""
    out = []
    for e in images:
        if e.get("pixels") is not None:
            p = e["pixels"]
            if tuple(p.shape) != (3, image_size, image_size):
                raise ValueError(f"pixels must be (3, {image_size}, {image_size}), got "
                                 f"{tuple(p.shape)} (set task_options image_size)")
            out.append(p)
        else:
            try:
                out.append(preprocess([e["image"]], image_size)[0])
            except (OSError, SyntaxError, EOFError, ValueError) as err:
                raise ValueError(f"{e.get('where', 'record')}: image {e['image']} cannot be "
                                 f"read ({type(err).__name__}: {err})") from None
    return torch.stack(out)
