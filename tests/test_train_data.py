"""Data (JSONL / CSV, truncation, dynamic padding, the length-bucketed sampler and its split over
micro-batches and ranks), the classification report, the config, the generated long-document
set."""
import json
import random

import pytest
import torch

from mmcore.train import LengthBucketSampler, TrainConfig, encode_texts, pad_batch, read_records
from mmcore.train.config import read_config_file
from mmcore.train.data import shard, split_micro
from mmcore.train.metrics import classification_report, format_confusion, format_report


def test_read_jsonl_and_csv(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"body": "one two", "y": "x", "imgs": ["p.png"]}) + "\n\n" +
                 json.dumps({"body": "three", "y": 1, "imgs": "/abs/q.png"}) + "\n")
    r = read_records(str(j), text_field="body", label_field="y", image_field="imgs")
    assert [x["text"] for x in r] == ["one two", "three"] and [x["label"] for x in r] == ["x", 1]
    assert r[0]["images"] == [str(tmp_path / "p.png")] and r[1]["images"] == ["/abs/q.png"]
    c = tmp_path / "b.csv"
    c.write_text('text,label,images\n"hello, world",pos,a.png;b.png\nbye,neg,\n')
    r = read_records(str(c))
    assert r[0]["text"] == "hello, world" and r[0]["images"] == [str(tmp_path / "a.png"),
                                                                 str(tmp_path / "b.png")]
    assert r[1]["images"] == [] and r[1]["label"] == "neg"


def test_read_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_records(str(bad))
    nofield = tmp_path / "n.jsonl"
    nofield.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="'text'"):
        read_records(str(nofield))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_encode_truncates_like_bert():
    from mmcore.models import default_text_model
    from mmcore.reading import load_tokenizer

    tok = load_tokenizer(default_text_model())
    text = " ".join(["harbour"] * 700)
    whole, cut = encode_texts(tok, [text]), encode_texts(tok, [text], max_tokens=512)
    assert len(whole[0]) == 702 and len(cut[0]) == 512
    assert cut[0][0] == tok.cls and cut[0][-1] == tok.sep and cut[0][:511] == whole[0][:511]


def test_pad_batch():
    ids, lengths = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]


def test_sampler_seeded_complete_and_bucketed():
    rng = random.Random(0)
    lengths = [rng.randint(10, 2000) for _ in range(203)]
    s = LengthBucketSampler(lengths, step_batch=8, seed=3, bucket_batches=4)
    e0, e0b, e1 = s.batches(0), s.batches(0), s.batches(1)
    assert e0 == e0b and e0 != e1
    assert sorted(i for b in e0 for i in b) == list(range(203)) and len(e0) == len(s) == 26
    plain = LengthBucketSampler(lengths, step_batch=8, seed=3, bucket=False).batches(0)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(e0) < 0.8 * padded(plain)  # bucketing cuts padding
    assert len(LengthBucketSampler(lengths, 8, drop_last=True).batches(0)) == 25
    assert LengthBucketSampler(lengths, 8, shuffle=False).batches(0)[0] == list(range(8))


def test_micro_batches_and_rank_shards_partition_a_step():
    step = list(range(100, 111))
    for accum in (1, 2, 3):
        micro = split_micro(step, accum)
        assert [i for m in micro for i in m] == step and len(micro) == accum
        for world in (1, 2, 3):
            for m in micro:
                parts = [shard(m, r, world) for r in range(world)]
                assert [i for p in parts for i in p] == m
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_classification_report_by_hand():
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    labels = torch.tensor([0, 1, 1, 1, 2, 0, 0, 2])
    rep = classification_report(preds, labels, ["a", "b", "c"])
    # class a: tp 2, predicted 3, support 3; b: tp 2, pred 3, sup 3; c: tp 1, pred 2, sup 2
    assert rep["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert rep["per_class"]["c"]["recall"] == pytest.approx(1 / 2)
    f1 = {k: 2 * p * r / (p + r) for k, p, r in (("a", 2 / 3, 2 / 3), ("b", 2 / 3, 2 / 3),
                                                 ("c", 1 / 2, 1 / 2))}
    assert rep["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert rep["weighted_f1"] == pytest.approx((3 * f1["a"] + 3 * f1["b"] + 2 * f1["c"]) / 8)
    assert rep["accuracy"] == pytest.approx(5 / 8)
    assert rep["confusion"] == [[2, 0, 1], [1, 2, 0], [0, 1, 1]]
    text = format_report(rep)
    assert "macro avg" in text and "weighted avg" in text and "0.625" in text
    assert "true\\pred" in format_confusion(rep["confusion"], ["a", "b", "c"])
    never = classification_report(torch.tensor([0, 0]), torch.tensor([0, 1]), ["a", "b"])
    assert never["per_class"]["b"]["precision"] == 0.0  # never predicted: 0, not NaN


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="lora_bias"):
        TrainConfig(lora_bias="some")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"unknown config keys \['lrate'\]"):
        TrainConfig.from_dict({"lrate": 1.0})
    y = tmp_path / "c.yaml"
    y.write_text("mode: bitfit\nlr: 0.001\ntarget_modules: [q, k]\n")
    assert TrainConfig.from_dict(read_config_file(str(y))).target_modules == ["q", "k"]
    y.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config_file(str(y))


def test_generated_set_decides_past_512():
    """Labels balanced; the deciding sentence starts past token 512 in every document, so a
    512-token cut never holds it; the first 512 tokens carry no label signal by construction
    (the filler is drawn from one distribution)."""
    from mmcore.models import default_text_model
    from mmcore.reading import load_tokenizer
    from mmcore.train.synthetic import long_document_splits

    sp = long_document_splits(6, 2, 4, seed=5, tokens=(560, 600))
    tok = load_tokenizer(default_text_model())
    for split in sp.values():
        assert sorted(r["label"] for r in split).count("granted") == len(split) // 2
        for r in split:
            ids = encode_texts(tok, [r["text"]])[0]
            assert r["decide_token"] > 512 and len(ids) == r["tokens"]
            cut = encode_texts(tok, [r["text"]], max_tokens=512)[0]
            assert "board" not in tok.tok.decode(cut) and "board" in tok.tok.decode(ids)
