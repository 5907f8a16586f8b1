"""Kill-and-resume: a `mmcore train` process killed (SIGKILL) mid-run and resumed with
`--resume DIR` ends with bitwise the same weights and AdamW state as an uninterrupted run,
on the CPU — with dropout in the head and on the LoRA path (RNG states), gradient accumulation
and a length-bucketed data order in play.  Also: keep-last-k + best pruning."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, out):
    model = tiny_model_dir(str(tmp_path / "model"))
    return dict(model=model, train_file=labelled_jsonl(str(tmp_path / "train.jsonl"), 24, seed=0),
                val_file=labelled_jsonl(str(tmp_path / "val.jsonl"), 8, seed=1),
                pooling="attention", window=8, mode="lora", lora_r=4, lora_dropout=0.1,
                dropout=0.1, lr=1e-2, epochs=5, batch_size=2, grad_accum=2, save_every=2,
                eval_every=5, keep_last=2, threads=1, progress=False, load_best=False,
                out_dir=str(out))


def _final(out):
    idx = json.load(open(os.path.join(out, "checkpoints", "index.json")))
    ck = os.path.join(out, "checkpoints", idx["last"][-1])
    return (idx, load_file(os.path.join(ck, "adapter", "adapter_model.safetensors")),
            load_file(os.path.join(ck, "optimizer.safetensors")),
            json.load(open(os.path.join(ck, "trainer_state.json"))))


def _rows(out):
    drop = ("elapsed_s", "tokens_per_s")
    return [{k: v for k, v in json.loads(ln).items() if k not in drop}
            for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()]


def _run_cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "mmcore", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_and_resume_is_bitwise(tmp_path):
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    cfg = _cfg(tmp_path, run_out)
    with open(tmp_path / "cfg.json", "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = _run_cli(["--config", str(tmp_path / "cfg.json")], env)
    # meanwhile: the uninterrupted reference, in this process
    threads = torch.get_num_threads()
    try:
        ref = train(TrainConfig.from_dict({**cfg, "out_dir": str(ref_out)}))
    finally:
        torch.set_num_threads(threads)
    total = ref["state"]["step"]
    assert total == 30
    idx_path = run_out / "checkpoints" / "index.json"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        if idx_path.exists():
            last = json.load(open(idx_path))["last"]
            if last and int(last[-1].split("-")[1]) >= 4:
                p.send_signal(signal.SIGKILL)
                killed_at = int(last[-1].split("-")[1])
                break
        time.sleep(0.02)
    out = p.communicate()[0]
    assert killed_at is not None and p.returncode == -signal.SIGKILL, \
        f"the run was not killed mid-way (rc {p.returncode}):\n{out[-2000:]}"
    assert killed_at < total
    r = _run_cli(["--resume", str(run_out)], env)
    log = r.communicate(timeout=600)[0]
    assert r.returncode == 0, log[-3000:]
    assert "resumed from" in log
    idx_a, w_a, o_a, s_a = _final(ref_out)
    idx_b, w_b, o_b, s_b = _final(run_out)
    assert s_a["step"] == s_b["step"] == total
    assert sorted(w_a) == sorted(w_b) and sorted(o_a) == sorted(o_b)
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k
    for k in o_a:
        assert torch.equal(o_a[k], o_b[k]), k
    assert s_a["best"] == s_b["best"] and s_a["best_step"] == s_b["best_step"]
    assert _rows(ref_out) == _rows(run_out)  # the log, too, continues exactly
    # keep_last=2 plus the best
    kept = sorted(n for n in os.listdir(ref_out / "checkpoints") if n.startswith("step-"))
    assert kept == sorted(set(idx_a["last"]) | {idx_a["best"]})
    assert idx_a["last"][-2:] == [f"step-{total - 2:06d}", f"step-{total:06d}"]
