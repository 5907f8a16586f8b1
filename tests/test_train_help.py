"""`mmcore train --help` as a user reads it (issue 22): one description per flag, the default
once and named (the MiniLM default, what no data files does), examples at the end; a
misspelled flag gets the train usage and the closest flag."""
import argparse

import pytest

from mmcore.cli import main
from mmcore.cli_train import add_train_parser


def _parser():
    ap = argparse.ArgumentParser(prog="mmcore")
    return add_train_parser(ap.add_subparsers(dest="cmd"))


def test_every_flag_has_one_description_and_one_default():
    p = _parser()
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 50
    for a in flags:
        text = a.help or ""
        name = a.option_strings[0]
        assert text and not text.startswith("("), f"{name}: no description ({text!r})"
        if name not in ("--config", "--resume", "--json"):
            assert text.count("(default") == 1, f"{name}: {text!r}"
        assert "default None" not in text and "(default: None)" not in text, name
    helps = {a.option_strings[0]: a.help for a in flags}
    assert "MiniLM" in helps["--model"] and "demo" in helps["--train-file"]
    assert "label" in helps["--label-field"]


def test_help_names_the_demo_and_ends_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "no data files" in out.lower() and "demo" in out
    tail = out[out.index("examples:"):]
    for cmd in ("mmcore train   ", "--train-file", "--config run.yaml", "--resume",
                "mmcore predict"):
        assert cmd in tail, cmd
    assert "docs/training.md" in tail


@pytest.mark.parametrize("argv,hint", [(["--lora_r", "4"], "did you mean --lora-r?"),
                                       (["--learning-rate", "1e-4"], None),
                                       (["--head_lr=0.02"], "did you mean --head-lr?")])
def test_misspelled_flag_gets_train_usage_and_a_hint(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mmcore train ")
    assert "mmcore train: error: unrecognized arguments: " + " ".join(argv) in err
    if hint:
        assert err.strip().splitlines()[-1] == hint
