"""A run directory is a model (issue 22): `mmcore train --config run.yaml` on a user's JSONL,
then `mmcore predict RUN new.jsonl --json` on unlabelled documents (some longer than 4,096
tokens) gives a label and probabilities per document, whose accuracy on the labelled copy is
the run's test accuracy; every input form gives the same predictions; bad input is one line
and exit 2 with nothing written; a different base model is refused; resuming a copied run
never writes into the original."""
import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

from kit_run import documents, hf_base, write_jsonl
from mmcore.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA run of the README recipe's shape (attention pooling, lora_only biases) on a tiny
    BERT, trained through the CLI from a YAML file; its test split holds 4 documents of
    4,200+ tokens."""
    d = tmp_path_factory.mktemp("run")
    base = hf_base(str(d / "base"))
    test = documents(8, 2) + documents(4, 3, words=(4200, 4300))
    (d / "run.yaml").write_text(
        f"model: {base}\n"
        f"train_file: {write_jsonl(d / 'train.jsonl', documents(32, 0))}\n"
        f"val_file: {write_jsonl(d / 'val.jsonl', documents(8, 1))}\n"
        f"test_file: {write_jsonl(d / 'test.jsonl', test)}\n"
        "window: 8\npooling: attention\nlr: 0.01\nhead_lr: 0.02\nlora_bias: lora_only\n"
        "epochs: 4\nbatch_size: 4\nthreads: 1\nprogress: false\n"
        f"out_dir: {d / 'runs' / 'x'}\n")
    n = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(d / "run.yaml")]) == 0
    finally:
        torch.set_num_threads(n)
    return {"dir": d, "run": str(d / "runs" / "x"), "base": base, "test": test}


def _predict(argv, capsys):
    rc = main(["predict", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _jsonl(text):
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def test_predict_accuracy_equals_test_accuracy(run, capsys):
    d = run["dir"]
    new = write_jsonl(d / "new.jsonl", run["test"], drop=("label",))  # unlabelled copy
    rc, out, err = _predict([run["run"], new, "--json", "--no-progress"], capsys)
    assert rc == 0, err
    rows = _jsonl(out)
    assert [r["index"] for r in rows] == list(range(12))
    assert [r["id"] for r in rows] == [r["id"] for r in run["test"]]
    for r in rows:
        assert set(r["probs"]) == {"approved", "refused"} and r["label"] in r["probs"]
        assert abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["probs"][r["label"]] == max(r["probs"].values())
    acc = sum(r["label"] == t["label"] for r, t in zip(rows, run["test"])) / len(rows)
    results = json.load(open(os.path.join(run["run"], "results.json")))
    assert results["test"]["accuracy"] >= 0.75  # it learned: the comparison means something
    assert acc == results["test"]["accuracy"]
    man = json.load(open(os.path.join(run["run"], "run.json")))
    assert man["task"] == "classification" and man["window"] == 8 and man["labels"] == [
        "approved", "refused"] and man["base"]["fingerprint"].startswith("sha256:")
    # labelled input: the accuracy is reported on stderr, the rows are the same
    rc, out2, err2 = _predict([run["run"], os.path.join(d, "test.jsonl"), "--json",
                               "--no-progress"], capsys)
    assert rc == 0 and _jsonl(out2) == rows and f"accuracy {acc:.4f}" in err2


def test_every_input_form_gives_the_same_predictions(run, capsys, tmp_path):
    import mmcore

    docs = run["test"][:3] + run["test"][-1:]  # short ones and one of 4,200+ tokens
    texts = [r["text"] for r in docs]
    ref = mmcore.load_run(run["run"]).predict(texts)
    folder = tmp_path / "letters"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    (tmp_path / "docs.csv").write_text(
        "body,id\n" + "".join(f"\"{t}\",{i}\n" for i, t in enumerate(texts)))
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n")
    forms = {"folder": [str(folder)],
             "csv": [str(tmp_path / "docs.csv"), "--text-field", "body"],
             "lines": [str(tmp_path / "lines.txt"), "--format", "lines"]}
    for name, argv in forms.items():
        rc, out, err = _predict([run["run"], *argv, "--json", "--batch-size", "3"], capsys)
        assert rc == 0, (name, err)
        got = _jsonl(out)
        assert [r["label"] for r in got] == [p["label"] for p in ref], name
        for g, p in zip(got, ref):
            for lab in p["probs"]:
                assert abs(g["probs"][lab] - p["probs"][lab]) < 1e-5, name
    rc, out, _ = _predict([run["run"], str(folder), "--json"], capsys)
    assert [r["id"] for r in _jsonl(out)] == ["0.txt", "1.txt", "2.txt", "3.txt"]
    one = tmp_path / "one.txt"
    one.write_text(texts[-1])
    rc, out, _ = _predict([run["run"], str(one)], capsys)  # a text file: one document
    assert rc == 0 and out.split("\t")[:2] == ["one.txt", ref[-1]["label"]]
    outf = tmp_path / "preds.jsonl"
    rc, out, err = _predict([run["run"], str(folder), "--out", str(outf)], capsys)
    assert rc == 0 and out == "" and len(_jsonl(outf.read_text())) == 4


def test_predict_reads_stdin(run, capsys, monkeypatch):
    import io

    doc = run["test"][-1]
    for stdin, fmt in ((doc["text"], "a document"), (json.dumps(doc) + "\n", "JSON lines")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        rc, out, err = _predict([run["run"], "-", "--json"], capsys)
        assert rc == 0, err
        rows = _jsonl(out)
        assert len(rows) == 1 and rows[0]["label"] in ("approved", "refused"), fmt
        assert rows[0]["id"] == (doc["id"] if fmt == "JSON lines" else None)


def test_bad_input_is_one_line_exit_2_nothing_written(run, capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 good".encode("latin-1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    docs = write_jsonl(tmp_path / "docs.jsonl", run["test"][:2])
    other = tmp_path / "other"
    shutil.copytree(run["run"], other)
    man = json.load(open(other / "run.json"))
    man["task"] = "retrieval"
    (other / "run.json").write_text(json.dumps(man))
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    cases = [
        ([run["run"], docs, "--text-field", "body"], "'body'"),
        ([run["run"], str(empty)], "empty.jsonl"),
        ([run["run"], str(bad)], "not UTF-8"),
        ([run["run"], str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([str(notrun), docs], "no run.json"),
        ([str(run["dir"] / "runs"), docs], "holds runs: x"),
        ([str(other), docs], "retrieval run"),
        ([run["run"], docs, "--gallery", str(tmp_path)], "--gallery"),
        ([run["run"], docs, "--base", str(notrun)], "model.safetensors"),
    ]
    for argv, needle in cases:
        out = tmp_path / "out.jsonl"
        rc, so, se = _predict([*argv, "--out", str(out)], capsys)
        assert rc == 2, (argv, se)
        lines = se.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmcore predict: error:") and \
            needle in lines[0], (argv, se)
        assert so == "" and not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_a_different_base_is_refused(run, tmp_path):
    import mmcore
    from mmcore.inference import Classifier

    other = hf_base(str(tmp_path / "other"), seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="not the one the run was trained on"):
        mmcore.load_run(run["run"], base=other)
    with pytest.raises(ValueError, match="classification run, not a vqa run"):
        mmcore.load_run(run["run"], task="vqa")
    moved = str(tmp_path / "moved")
    shutil.copytree(run["base"], moved)  # the same base at another path is accepted
    m = mmcore.load_run(run["run"], base=moved)
    assert isinstance(m, Classifier) and isinstance(m, torch.nn.Module)
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def _tree_digest(root):
    h = {}
    for dp, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dp, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_resuming_a_copied_run_never_touches_the_original(run, tmp_path, capsys):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    (tmp_path / "runs").mkdir()
    d = run["dir"]
    n = torch.get_num_threads()
    try:
        assert main(["train", "--model", run["base"], "--train-file", str(d / "train.jsonl"),
                     "--test-file", str(d / "test.jsonl"), "--window", "8", "--max-steps",
                     "2", "--batch-size", "4", "--threads", "1", "--no-progress",
                     "--out-dir", str(a)]) == 0
        shutil.copytree(a, b)
        before = _tree_digest(a)
        assert main(["train", "--resume", str(b), "--max-steps", "4"]) == 0
    finally:
        torch.set_num_threads(n)
    capsys.readouterr()
    assert _tree_digest(a) == before  # byte for byte
    assert os.path.isdir(b / "checkpoints" / "step-000004")
    assert json.load(open(b / "results.json"))["state"]["step"] == 4
    rows = [json.loads(x) for x in open(b / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 4


@pytest.mark.parametrize("mode", ["lora", "bitfit", "full", "head"])
def test_every_mode_reloads_to_the_trained_model(mode, run, tmp_path):
    """load_run rebuilds exactly the model the run tested: the logits of the in-memory trained
    model equal the reloaded one's, bitwise (same code, same weights)."""
    import mmcore
    from mmcore.train import TrainConfig, train

    d = run["dir"]
    n = torch.get_num_threads()
    try:
        res = train(TrainConfig(model=run["base"], train_file=str(d / "train.jsonl"),
                                mode=mode, lora_bias="all", window=8, pooling="cls",
                                max_steps=2, batch_size=4, lr=1e-2, threads=1, progress=False,
                                out_dir=str(tmp_path / mode)), log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    files = json.load(open(tmp_path / mode / "run.json"))["files"]
    assert bool(files["adapter"]) == (mode == "lora")
    assert bool(files["encoder"]) == (mode in ("bitfit", "full"))
    texts = [r["text"] for r in run["test"][:4]]
    m = mmcore.load_run(str(tmp_path / mode))
    from mmcore.train.data import pad_batch

    trained = res["model"].eval()
    with torch.no_grad():
        for t in texts:
            ids, lens = pad_batch(m.encode([t]))
            want = trained(ids, lens)["logits"]
            assert torch.equal(m.logits([t]), want), mode
