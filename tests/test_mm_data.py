"""The multimodal data: scikit-learn's digits (real images, upsampled) with generated
captions and questions, and the user format (image folder + JSONL) read back the same."""
import json
import re

import pytest
import torch

from mmcore.models.vision_encoder import CLIP_MEAN, CLIP_STD
from mmcore.train.data import read_records
from mmcore.train.images import DIGIT_WORDS, digits_records, load_digits, load_pixels, \
    records_from_folder, write_digits_folder


def test_digits_are_real_upsampled_and_split_disjoint():
    pix, y = load_digits(24)
    assert pix.shape == (1797, 3, 24, 24) and y.shape == (1797,)
    assert torch.equal(torch.bincount(y).clamp(max=1), torch.ones(10, dtype=torch.long))
    grey = pix * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)  # grey: the same in R, G, B
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5 and grey.std() > 0.2  # not blank
    s = digits_records("captions", seed=3, image_size=24)
    ids = {k: {r["image_id"] for r in v} for k, v in s.items()}
    assert [len(s[k]) for k in ("train", "validation", "test")] == [1257, 180, 360]
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    for r in s["test"][:50]:
        d = r["digit"]
        assert r["label"] == str(d)
        assert re.search(rf"\b({DIGIT_WORDS[d]}|{d})\b", r["text"]), r["text"]
        assert torch.equal(r["pixels"], pix[r["image_id"]])
        assert int(y[r["image_id"]]) == d


def test_questions_have_consistent_answers():
    s = digits_records("questions", seed=1, sizes=(200, 0, 0))
    answers = set()
    for r in s["train"]:
        d, q, a = r["digit"], r["text"], r["label"]
        answers.add(a)
        if q.startswith("is the digit even"):
            assert a == ("even" if d % 2 == 0 else "odd")
        elif q.startswith("is this digit larger than"):
            t = DIGIT_WORDS.index(q.rstrip("?").split()[-1])
            assert a == ("yes" if d > t else "no")
        elif q.startswith("is this a "):
            assert a == ("yes" if q.rstrip("?").split()[-1] == DIGIT_WORDS[d] else "no")
        else:
            assert a == DIGIT_WORDS[d]
    assert answers <= set(DIGIT_WORDS) | {"even", "odd", "yes", "no"} and len(answers) > 8


def test_folder_format_reads_back_the_same_pixels(tmp_path):
    """PNG + JSONL written in the user format and read through the trainer's reader and CLIP
    preprocessing give the in-memory pixels back to 8-bit rounding."""
    paths = write_digits_folder(str(tmp_path), image_size=32, limit=12)
    recs = read_records(paths["train"])
    mem = digits_records("captions", image_size=32)["train"][:12]
    assert [r["text"] for r in recs] == [r["text"] for r in mem]
    with open(paths["train"]) as f:
        first = json.loads(f.readline())
    assert set(first) == {"images", "text", "label"} and not first["images"].startswith("/")
    got = load_pixels([{"image": r["images"][0]} for r in recs], 32)
    want = torch.stack([r["pixels"] for r in mem])
    assert (got - want).abs().max() < 0.5 / 255 / 0.26 + 1e-4
    (tmp_path / "captions.jsonl").write_text(open(paths["train"]).read())
    assert len(records_from_folder(str(tmp_path))) == 12


def test_pixels_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="pixels must be"):
        load_pixels([{"pixels": torch.zeros(3, 8, 8)}], 16)
    with pytest.raises(ValueError, match="kind"):
        digits_records("stories")
