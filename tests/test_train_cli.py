"""`mmcore train`: config file + flags, --json, the outputs it promises, errors that name the
option (no traceback), the embedded default (a CI-sized smoke run on the real MiniLM-L6, and
the full run, opt-in: MMCORE_TRAIN_LONG=1 — about 10 minutes on an idle 2-core CPU)."""
import json
import os
import time

import pytest
import torch

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.cli import main


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_config_file_flags_and_outputs(tmp_path, capsys, keep_threads):
    model = tiny_model_dir(str(tmp_path / "model"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {model}\n"
        f"train_file: {labelled_jsonl(str(tmp_path / 'tr.jsonl'), 16, seed=0)}\n"
        f"val_file: {labelled_jsonl(str(tmp_path / 'va.jsonl'), 6, seed=1)}\n"
        f"test_file: {labelled_jsonl(str(tmp_path / 'te.jsonl'), 6, seed=2)}\n"
        "mode: bitfit\nwindow: 8\nlr: 0.5\nbatch_size: 4\nepochs: 1\nthreads: 1\n")
    out = tmp_path / "out"
    rc = main(["train", "--config", str(cfg), "--lr", "0.02", "--eval-every", "2",
               "--no-progress", "--out-dir", str(out), "--json"])
    text = capsys.readouterr().out
    assert rc == 0
    res = _last_json(text)
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["steps"] == 4
    for f in ("metrics.jsonl", "curves.png", "report.json", "report.txt", "results.json"):
        assert (out / f).is_file(), f
    assert "macro avg" in text and "confusion matrix" in text
    state = json.load(open(os.path.join(res["best_checkpoint"], "trainer_state.json")))
    assert state["config"]["lr"] == 0.02 and state["config"]["mode"] == "bitfit"  # flag wins
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert all("lr" in r and "tokens_per_s" in r for r in rows if r["split"] == "train")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,needle", [
    (["--lora-bias", "some"], "lora_bias"),
    (["--batch-size", "0"], "batch_size"),
    (["--train-file", "/nonexistent/t.jsonl"], "/nonexistent/t.jsonl"),
    (["--task", "no-such-task", "--train-file", "x"], "no-such-task"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["--config", "/nonexistent/c.yaml"], "--config"),
])
def test_errors_name_the_option(argv, needle, capsys):
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--lr", "fast"])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


def test_default_smoke(tmp_path, capsys, keep_threads):
    """The embedded default's code path at CI size (4 documents per split, one epoch): both
    fine-tunes run on the real MiniLM-L6 and the last line holds both accuracies."""
    rc = main(["train", "--synthetic-sizes", "4,2,4", "--synthetic-tokens", "560,580",
               "--epochs", "1", "--threads", "1", "--no-progress", "--out-dir",
               str(tmp_path / "d"), "--json"])
    text = capsys.readouterr().out
    assert rc == 0
    res = _last_json(text)
    assert 0 <= res["test_accuracy"] <= 1 and 0 <= res["truncated_test_accuracy"] <= 1
    assert res["train_docs"] == 4 and res["deciding_token_min"] > 512
    assert "cut at 512 tokens" in text
    for sub in ("long", "truncated-512"):
        assert (tmp_path / "d" / sub / "report.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMCORE_TRAIN_LONG") != "1",
                    reason="the full default run takes ~10 minutes; MMCORE_TRAIN_LONG=1 runs it "
                           "(test_default_smoke covers its code path in CI)")
def test_default_full_run(tmp_path, capsys):
    """Issue 13's target: >= 90 % test accuracy reading whole documents, <= 60 % cut at 512
    tokens, in <= 10 minutes on an idle 2-core CPU."""
    t = time.perf_counter()
    rc = main(["train", "--no-progress", "--out-dir", str(tmp_path / "d"), "--json"])
    secs = time.perf_counter() - t
    res = _last_json(capsys.readouterr().out)
    assert rc == 0
    assert res["test_accuracy"] >= 0.9 and res["truncated_test_accuracy"] <= 0.6, res
    assert secs <= 600, f"{secs:.0f} s"
