"""`mmcore predict` on multimodal runs (issue 22), user-format data (PNG folder + JSONL):
vqa answers with the accuracy of the run's test; retrieval ranks a gallery with the run's
text -> image recall@1; matching scores each (caption, image) pair as the embeddings of the
same pair do, whatever the batch order."""
import json
import os

import pytest
import torch

from kit_run import hf_base
from mmcore.cli import main
from mmcore.train.images import ANSWERS, write_digits_folder


def _train(tmp, base, task, data, *extra):
    n = torch.get_num_threads()
    out = str(tmp / f"run-{task}")
    try:
        assert main(["train", "--task", task, "--model", base, "--train-file", data["train"],
                     "--val-file", data["validation"], "--test-file", data["test"],
                     "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--head-lr",
                     "2e-3", "--window", "0", "--threads", "1", "--no-progress",
                     "--out-dir", out, *extra]) == 0
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm")
    return {"dir": d, "base": hf_base(str(d / "base")),
            "questions": write_digits_folder(str(d / "q"), kind="questions", limit=64),
            "captions": write_digits_folder(str(d / "c"), kind="captions", limit=64)}


def _rows(capsys, argv):
    rc = main(["predict", *argv, "--json", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [json.loads(x) for x in out.out.splitlines()], out.err


def test_vqa_answers_with_the_runs_test_accuracy(data, capsys, tmp_path):
    run = _train(tmp_path, data["base"], "vqa", data["questions"],
                 "--labels", ",".join(ANSWERS), "--task-options", "fusion_heads=2")
    capsys.readouterr()
    test = data["questions"]["test"]
    rows, err = _rows(capsys, [run, test])
    truth = [json.loads(x)["label"] for x in open(test)]
    assert len(rows) == len(truth) and all(set(r["probs"]) == set(ANSWERS) for r in rows)
    acc = sum(r["label"] == t for r, t in zip(rows, truth)) / len(truth)
    assert acc == json.load(open(os.path.join(run, "results.json")))["test"]["accuracy"]
    assert f"accuracy {acc:.4f}" in err


def test_retrieval_ranks_with_the_runs_recall(data, capsys, tmp_path):
    run = _train(tmp_path, data["base"], "retrieval", data["captions"])
    capsys.readouterr()
    test = data["captions"]["test"]
    recs = [json.loads(x) for x in open(test)]
    label_of = {os.path.abspath(os.path.join(os.path.dirname(test), r["images"])): r["label"]
                for r in recs}
    rows, _ = _rows(capsys, [run, test, "--gallery", test, "--top-k", "3"])
    assert len(rows) == len(recs)
    for r in rows:
        s = [h["score"] for h in r["top"]]
        assert len(s) == 3 and s == sorted(s, reverse=True)
    r1 = sum(label_of[os.path.abspath(r["top"][0]["image"])] == q["label"]
             for r, q in zip(rows, recs)) / len(recs)
    res = json.load(open(os.path.join(run, "results.json")))["test"]
    assert r1 == res["t2i_recall@1"]
    rc = main(["predict", run, test])  # no gallery: one line, exit 2
    assert rc == 2 and "--gallery" in capsys.readouterr().err


def test_matching_scores_each_pair(data, capsys, tmp_path):
    import mmcore

    run = _train(tmp_path, data["base"], "matching", data["captions"])
    capsys.readouterr()
    test = data["captions"]["test"]
    recs = [json.loads(x) for x in open(test)]
    rows, _ = _rows(capsys, [run, test, "--batch-size", "5"])
    m = mmcore.load_run(run)
    images = [os.path.join(os.path.dirname(test), r["images"]) for r in recs]
    ret = m.task  # the same text / image towers, embedded separately and in another order
    from mmcore.train.data import pad_batch
    from mmcore.train.images import load_pixels

    ids, lens = pad_batch(m.encode([r["text"] for r in recs][::-1]))
    with torch.no_grad():
        t = m.model.encode_text(ids, lens).flip(0)
        v = m.model.encode_image(load_pixels([{"image": p} for p in images], ret.image_size))
    want = (t * v).sum(-1)
    got = torch.tensor([r["score"] for r in rows])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert want.std() > 1e-3  # pairs differ: the check can tell them apart


def test_doc_figures_answers_with_the_runs_test_accuracy(data, tmp_path):
    """Long documents with a figure each (pixels, not paths), through the Python API."""
    import mmcore
    from mmcore.train import TrainConfig, train
    from mmcore.train.tasks import get_task
    from mmcore.train.tasks.doc_figures import documents_with_figures

    cfg = {**get_task("doc_figures").demo_defaults, "task": "doc_figures", "model": data["base"],
           "synthetic_sizes": [16, 4, 8], "synthetic_tokens": [560, 660], "epochs": 1,
           "batch_size": 8, "window": 16, "task_options": {"fusion_heads": 2}, "threads": 1,
           "progress": False, "out_dir": str(tmp_path / "run")}
    n = torch.get_num_threads()
    try:
        res = train(TrainConfig(**cfg), log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    recs = documents_with_figures(0, [16, 4, 8], [560, 660], 32, data["base"])["test"]
    m = mmcore.load_run(str(tmp_path / "run"), task="doc_figures")
    pred = m.predict([r["text"] for r in recs], images=[[r["pixels"]] for r in recs],
                     batch_size=3)
    acc = sum(p["label"] == r["label"] for p, r in zip(pred, recs)) / len(recs)
    assert acc == res["test"]["accuracy"] and len(pred[0]["probs"]) == len(m.labels) == 4
