"""Issue 24: the trainer, its configuration, its data files and --resume under bad input.

Every bad input is one line naming the option / field / file / record (exit 2 at the CLI;
exit 1 for a run that diverges), never a traceback, a crash, or a NaN model kept as best."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.cli import main
from mmcore.train import TrainConfig, read_records
from mmcore.train.config import read_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_bad")
    model = tiny_model_dir(d / "model")
    tr = labelled_jsonl(d / "tr.jsonl", 12)
    va = labelled_jsonl(d / "va.jsonl", 4, seed=1)
    return dict(dir=d, model=model, tr=tr, va=va,
                base=["train", "--model", model, "--train-file", tr, "--val-file", va,
                      "--no-progress", "--batch-size", "4", "--threads", "1",
                      "--eval-batch-size", "4"])


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err


def one_line(err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mmcore train: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ the config layer

@pytest.mark.parametrize("field,value,needle", [
    ("lr", float("inf"), "lr"), ("lr", float("nan"), "lr"), ("lr", "abc", "lr"),
    ("lr", True, "lr"), ("head_lr", float("nan"), "head_lr"), ("head_lr", -1.0, "head_lr"),
    ("head_lr", 0.0, "head_lr"), ("class_weights", "abc", "class_weights"),
    ("class_weights", [-1, 2], "class_weights"), ("class_weights", [0, 0], "class_weights"),
    ("class_weights", [float("nan"), 1], "class_weights"),
    ("fgm_epsilon", float("nan"), "fgm_epsilon"), ("fgm_epsilon", float("inf"), "fgm_epsilon"),
    ("lora_alpha", float("nan"), "lora_alpha"), ("lora_alpha", float("inf"), "lora_alpha"),
    ("adam_eps", -1.0, "adam_eps"), ("synthetic_tokens", [10, 5], "synthetic_tokens"),
    ("synthetic_tokens", [700, 600], "synthetic_tokens"), ("synthetic_sizes", [1], "synthetic_sizes"),
    ("task_options", [1, 2], "task_options"), ("task_options", None, "task_options"),
    ("task_options", "{bad", "task_options"), ("task_options", {"temperature": float("nan")},
                                               "temperature"),
    ("labels", [["yes"], "no"], "labels"), ("labels", [{"a": 1}, "no"], "labels"),
    ("labels", ["1", 1], "labels"), ("labels", ["a", "a"], "labels"),
    ("threads", 1_000_000, "threads"), ("device", "bogus", "device"),
    ("backend", "bogus", "backend"), ("seed", -1, "seed"), ("batch_size", 2**40, "batch_size"),
    ("max_grad_norm", float("inf"), "max_grad_norm"), ("weight_decay", float("nan"), "weight_decay"),
])
def test_config_refuses_with_the_field_named(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{field: value})


def test_config_without_cuda_refuses_cuda_device_and_backend():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    for kw in (dict(device="cuda"), dict(backend="cuda")):
        with pytest.raises(ValueError, match="CUDA"):
            TrainConfig(**kw)


def test_config_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("epochs: 1\nlr: abc\n")
    d, src = read_config_file(str(p), with_sources=True)
    with pytest.raises(ValueError, match=r"run.yaml line 2 \(lr\)"):
        TrainConfig.from_dict(d, src)
    p.write_text('{"epochs": 1,\n "lr": true}')
    d, src = read_config_file(str(p), with_sources=True)
    with pytest.raises(ValueError, match=r"line 2 \(lr\)"):
        TrainConfig.from_dict(d, src)


def test_config_file_with_bom_and_yaml_exponent(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes("\ufefflr: 1e-4\nepochs: 2\n".encode())
    cfg = TrainConfig.from_dict(read_config_file(str(p)))
    assert cfg.lr == 1e-4 and cfg.epochs == 2


@pytest.mark.parametrize("extra,needle", [
    (["--lr", "inf"], "--lr"), (["--head-lr", "nan"], "--head-lr"),
    (["--threads", "1000000"], "--threads"), (["--adam-eps", "-1"], "--adam-eps"),
    (["--class-weights=-1,2"], "--class-weights"), (["--class-weights", "0,0"], "--class-weights"),
    (["--fgm-epsilon", "nan"], "--fgm-epsilon"), (["--lora-alpha", "inf"], "--lora-alpha"),
    (["--head-lr", "0"], "--head-lr"), (["--labels", "pos,pos,neg"], "--labels"),
    (["--task-options", "{bad"], "--task-options"),
    (["--task-options", "temperature=1"], "classification"),
    (["--synthetic-tokens", "10,5"], "--synthetic-tokens"),
    (["--synthetic-sizes", "1"], "--synthetic-sizes"),
])
def test_cli_flags_one_line_exit_2(setup, capsys, extra, needle, tmp_path):
    rc, err = run(setup["base"] + ["--out-dir", str(tmp_path / "o")] + extra, capsys)
    assert rc == 2
    one_line(err, needle)
    assert not os.path.exists(tmp_path / "o"), "nothing is written before the inputs are valid"


def test_cli_out_dir_that_is_a_file(setup, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = run(setup["base"] + ["--out-dir", str(f), "--max-steps", "1"], capsys)
    assert rc == 2
    one_line(err, "--out-dir")


def test_threads_bound_in_a_subprocess(setup, tmp_path):
    """The crash (SIGSEGV in torch.set_num_threads) as the user met it: a real process."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "mmcore", *setup["base"], "--threads", "1000000",
                        "--out-dir", str(tmp_path / "o")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    one_line(p.stderr, "--threads", "CPUs")


# ------------------------------------------------------------------ divergence

def test_diverging_run_stops_with_the_step_and_no_nan_best(setup, capsys, tmp_path):
    out = tmp_path / "o"
    rc, err = run(setup["base"] + ["--out-dir", str(out), "--lr", "1e30", "--max-steps", "2"],
                  capsys)
    assert rc == 1
    one_line(err, "step 1", "learning rate")
    ck = out / "checkpoints"
    if (ck / "index.json").exists():
        idx = json.loads((ck / "index.json").read_text())
        assert idx["best"] is None
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                for t in load_file(os.path.join(root, f)).values():
                    assert torch.isfinite(t.float()).all()


def test_nan_metric_is_never_best():
    from mmcore.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.state = {"best": None}
    t.cfg = TrainConfig(eval_mode="max")
    assert not t._improved(float("nan"))
    assert t._improved(0.5)


# ------------------------------------------------------------------ resume

@pytest.fixture(scope="module")
def run_dir(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(setup["base"] + ["--out-dir", str(out), "--max-steps", "2", "--save-every", "1",
                                 "--eval-every", "1"]) == 0
    return out


def _damaged(run_dir, tmp_path, how):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    idx = json.loads((d / "checkpoints" / "index.json").read_text())
    ck = d / "checkpoints" / idx["last"][-1]
    how(d, ck)
    return d


def _flip(path, at=-40):
    b = bytearray(path.read_bytes())
    b[at] ^= 0x5A
    path.write_bytes(bytes(b))


RESUME_CASES = {
    "truncated optimizer": (lambda d, ck: (ck / "optimizer.safetensors").write_bytes(
        (ck / "optimizer.safetensors").read_bytes()[:100]), "optimizer.safetensors"),
    "empty rng": (lambda d, ck: (ck / "rng.safetensors").write_bytes(b""), "rng.safetensors"),
    "garbled rng bytes": (lambda d, ck: _flip(ck / "rng.safetensors"), "rng.safetensors"),
    "garbled adapter bytes": (lambda d, ck: _flip(ck / "adapter" / "adapter_model.safetensors"),
                              "adapter_model.safetensors"),
    "pickle as safetensors": (lambda d, ck: (ck / "adapter" / "adapter_model.safetensors")
                              .write_bytes(b"\x80\x04\x95" + b"\x00" * 64),
                              "adapter_model.safetensors"),
    "index not an object": (lambda d, ck: (d / "checkpoints" / "index.json").write_text("[1]"),
                            "index.json"),
    "index without last": (lambda d, ck: (d / "checkpoints" / "index.json").write_text(
        '{"best": null}'), "index.json"),
    "state not JSON": (lambda d, ck: (ck / "trainer_state.json").write_text('{"oops"'),
                       "trainer_state.json"),
    "state step -5": (lambda d, ck: (ck / "trainer_state.json").write_text(json.dumps(
        dict(json.loads((ck / "trainer_state.json").read_text()), step=-5))),
        "trainer_state.json"),
    "adapter config ]]": (lambda d, ck: (ck / "adapter" / "adapter_config.json").write_text("]]"),
                          "adapter_config.json"),
}


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_damaged_resume_one_line_naming_the_file(run_dir, tmp_path, capsys, name):
    how, needle = RESUME_CASES[name]
    d = _damaged(run_dir, tmp_path, how)
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    rc, err = run(["train", "--resume", str(d), "--max-steps", "4", "--no-progress",
                   "--out-dir", str(d)], capsys)
    assert rc == 2
    one_line(err, needle)
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before, "nothing written"


def test_resume_with_another_lora_r_names_the_tensor(run_dir, tmp_path, capsys):
    d = _damaged(run_dir, tmp_path, lambda d, ck: None)
    rc, err = run(["train", "--resume", str(d), "--max-steps", "4", "--no-progress",
                   "--out-dir", str(d), "--lora-r", "4"], capsys)
    assert rc == 2
    one_line(err, "adapter_model.safetensors", "lora_r")


def test_resume_still_works(run_dir, tmp_path, capsys):
    d = _damaged(run_dir, tmp_path, lambda d, ck: None)
    rc, err = run(["train", "--resume", str(d), "--max-steps", "3", "--no-progress",
                   "--out-dir", str(d)], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------ data files

def _jsonl(path, rows, bom=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes((("\ufeff" if bom else "") + text).encode())
    return str(path)


def test_jsonl_with_bom_is_read(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
               bom=True)
    assert [r["label"] for r in read_records(p)] == ["x", "y"]


@pytest.mark.parametrize("rows,needle", [
    ([{"text": "a", "label": ["yes"]}], "line 1"),
    ([{"text": "a", "label": {"k": 1}}], "line 1"),
    (['{"text": "a", "label": NaN}'], "line 1"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "1"}], "line 2"),
    ([{"text": "a", "images": 42}], "line 1"),
    ([{"text": "a", "images": [1, 2]}], "line 1"),
    ([{"text": 5}], "line 1"),
])
def test_bad_records_name_file_and_line(tmp_path, rows, needle):
    p = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=needle) as e:
        read_records(p)
    assert "bad.jsonl" in str(e.value)


def test_csv_unterminated_quote(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('text,label\n"a,x\nb,y\n')
    with pytest.raises(ValueError, match="q.csv"):
        read_records(str(p))


def test_missing_label_names_the_record(setup, capsys, tmp_path):
    p = _jsonl(tmp_path / "nolab.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d"}])
    rc, err = run(setup["base"][:3] + ["--train-file", p, "--no-progress", "--out-dir",
                                       str(tmp_path / "o")], capsys)
    assert rc == 2
    one_line(err, "nolab.jsonl line 2", "label")
    rc, err = run(setup["base"] + ["--label-field", "nope", "--out-dir", str(tmp_path / "o")],
                  capsys)
    assert rc == 2
    one_line(err, "nope")


def _images(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "ok.png")
    b = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(b[:len(b) // 2])
    (tmp_path / "text.png").write_text("hello")
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 Mpx > PIL's limit


@pytest.mark.parametrize("name", ["trunc.png", "text.png", "bomb.png", "/etc/passwd"])
def test_images_that_are_not_images_name_the_record(tmp_path, name):
    from mmcore.train.images import check_image

    _images(tmp_path)
    path = name if os.path.isabs(name) else str(tmp_path / name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not on this system")
    with pytest.raises(ValueError, match="rec.jsonl line 3"):
        check_image(path, "rec.jsonl line 3")
    check_image(str(tmp_path / "ok.png"), "ok")


# ------------------------------------------------------------------ the retrieval index

def test_retrieval_index_refuses_integer_storage_and_nan_rows():
    from mmcore.train.retrieval_index import RetrievalIndex

    with pytest.raises(ValueError, match="floating"):
        RetrievalIndex(8, dtype=torch.int8)
    idx = RetrievalIndex(8)
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        idx.add(x)
    idx.add(torch.randn(4, 8))
    with pytest.raises(ValueError, match="queries"):
        idx.search(torch.full((1, 8), float("inf")))


# ------------------------------------------------------------------ the dispatch table variable

@pytest.mark.parametrize("content", [None, "{bad json"])
def test_bad_dispatch_table_never_breaks_import(tmp_path, content):
    path = tmp_path / "t.json" if content is not None else "/nonexistent/t.json"
    if content is not None:
        path.write_text(content)
    env = dict(os.environ, PYTHONPATH=ROOT, MMCORE_DISPATCH_TABLE=str(path))
    code = ("import warnings, torch, mmcore\n"
            "from mmcore.ops import tables\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "print(mmcore.window_attention(q, q, q, window=(2, 2), backend='auto').shape)\n"
            "print(tables.describe('cpu'))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "MMCORE_DISPATCH_TABLE" in p.stderr and p.stderr.count("RuntimeWarning") == 1
    assert "heuristics" in p.stdout


@pytest.mark.parametrize("content", ["[1, 2]", '{"format": 1, "ops": 3}',
                                     '{"format": 1, "ops": {"window_attention": [{"kind": 1}]}}'])
def test_malformed_dispatch_table_is_a_value_error_naming_it(tmp_path, content):
    from mmcore.ops import tables

    p = tmp_path / "t.json"
    p.write_text(content)
    with pytest.raises(ValueError, match="t.json"):
        tables._read(str(p))


# ------------------------------------------------------------------ model / adapter loading

def test_from_pretrained_takes_dtype_names_and_refuses_others():
    from mmcore.models import TextEncoder, default_text_model

    m = TextEncoder.from_pretrained(default_text_model(), dtype="float16")
    assert next(m.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        TextEncoder.from_pretrained(default_text_model(), dtype="int8")


@pytest.mark.parametrize("name", ["a.b", "", " x", 3])
def test_load_adapter_refuses_bad_adapter_names(tmp_path, name):
    from mmcore.nn import load_adapter

    with pytest.raises(ValueError, match="adapter_name"):
        load_adapter(torch.nn.Linear(4, 4), str(tmp_path), adapter_name=name)
