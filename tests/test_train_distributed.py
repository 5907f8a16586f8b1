"""Scale-out on the CPU (gloo): `torchrun --nproc_per_node 2 -m mmcore train` as DDP and with
--fsdp (FSDP2 fully_shard) ends with the same weights as one process with the same global
batch; checkpoints written by 2 processes resume on 1.

Same weights means equal up to the float summation order of the gradient average (the update
is otherwise the same function of the same examples): max |Δ| <= 1e-4 · max |trained − init|
+ 1e-6, where a wrong batch split or a skipped micro-batch gives differences of the order of the
update itself; the token count shows each example was read once."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    cfg = dict(model=tiny_model_dir(str(d / "model")),
               train_file=labelled_jsonl(str(d / "train.jsonl"), 24, seed=0),
               val_file=labelled_jsonl(str(d / "val.jsonl"), 10, seed=1),
               pooling="attention", window=8, mode="lora", lora_r=4, lora_bias="lora_only",
               dropout=0.0, lr=1e-2, max_steps=6, save_every=3, eval_every=3, threads=1,
               progress=False, load_best=False, adam_eps=1e-6)
    path = d / "cfg.json"
    path.write_text(json.dumps(cfg))
    threads = torch.get_num_threads()
    try:  # one process, global batch 4 (in this process)
        one = train(TrainConfig.from_dict({**cfg, "batch_size": 4, "out_dir": str(d / "one")}))
    finally:
        torch.set_num_threads(threads)
    return {"dir": d, "cfg": cfg, "cfg_path": str(path), "one": one}


def _torchrun(setup, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "mmcore", "train", "--config",
                        setup["cfg_path"], "--batch-size", "2", "--out-dir", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def _weights(out, step):
    ck = os.path.join(out, "checkpoints", f"step-{step:06d}")
    return load_file(os.path.join(ck, "adapter", "adapter_model.safetensors")), \
        json.load(open(os.path.join(ck, "trainer_state.json")))


def _init(setup):
    """The trainable tensors before training (LoRA B = 0, the seeded A and head)."""
    from mmcore.train.modes import apply_mode
    from mmcore.train.tasks import get_task

    cfg = TrainConfig.from_dict({**setup["cfg"], "labels": ["neg", "pos"]})
    from mmcore.train.trainer import seed_everything

    seed_everything(cfg.seed)
    task = get_task("classification")(cfg)
    m = task.build_model()
    apply_mode(m, "lora", target_modules=cfg.target_modules, r=cfg.lora_r,
               lora_alpha=cfg.lora_alpha, bias=cfg.lora_bias)
    from mmcore.train.checkpoint import peft_key

    return {peft_key(n): p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _assert_same(a, b, init):
    assert sorted(a) == sorted(b)
    for k in a:
        moved = (a[k] - init[k]).abs().max().item()
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= 1e-4 * moved + 1e-6, f"{k}: differs by {diff:.3e} (update {moved:.3e})"


def test_ddp_two_processes_equal_one(setup):
    out = setup["dir"] / "ddp"
    log = _torchrun(setup, out)
    assert "2 process(es) x batch 2" in log
    a, sa = _weights(out, 6)
    b, sb = _weights(setup["dir"] / "one", 6)
    assert sa["world_size"] == 2 and sb["world_size"] == 1 and sa["global_batch"] == 4
    assert sa["tokens"] == sb["tokens"]  # every example once, over both ranks
    init = _init(setup)
    assert any((a[k] - init[k]).abs().max() > 1e-3 for k in a)  # it trained
    _assert_same(a, b, init)
    assert sa["last_eval"]["accuracy"] == sb["last_eval"]["accuracy"]
    # a 2-process checkpoint resumes on 1 process and lands where the 2-process run did
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig.from_dict({**setup["cfg"], "batch_size": 2,
                                           "out_dir": str(setup["dir"] / "resumed")}),
                    resume=str(out / "checkpoints" / "step-000003"))
    finally:
        torch.set_num_threads(threads)
    assert res["state"]["step"] == 6
    c, _ = _weights(setup["dir"] / "resumed", 6)
    _assert_same(c, a, init)


def test_fsdp2_two_processes(setup):
    """--fsdp: fully_shard per encoder layer + root over 2 gloo ranks; the gathered
    checkpoint equals the one-process run and resumes unsharded on one process."""
    out = setup["dir"] / "fsdp"
    _torchrun(setup, out, "--fsdp")
    a, sa = _weights(out, 6)
    assert sa["world_size"] == 2 and sa["config"]["fsdp"] is True
    init = _init(setup)
    b, _ = _weights(setup["dir"] / "one", 6)
    _assert_same(a, b, init)
    threads = torch.get_num_threads()
    try:
        train(TrainConfig.from_dict({**setup["cfg"], "batch_size": 4,
                                     "out_dir": str(setup["dir"] / "fsdp-resumed")}),
              resume=str(out / "checkpoints" / "step-000003"))
    finally:
        torch.set_num_threads(threads)
    c, _ = _weights(setup["dir"] / "fsdp-resumed", 6)
    _assert_same(c, a, init)
