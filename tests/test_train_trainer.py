"""The Trainer's knobs on a tiny BERT: warm-up schedules, gradient accumulation (= a bigger
batch), early stopping with patience, bf16 / fp16 autocast (GradScaler state checkpointed),
FGM on a frozen embedding, full fine-tuning checkpoints, and long-document mode reading a
padded batch exactly as each document alone (seqlens from dynamic padding)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kit_train import labelled_jsonl, tiny_model_dir
from mmcore.train import TrainConfig, train
from mmcore.train.optim import lr_factor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    return dict(model=tiny_model_dir(str(d / "model")),
                train_file=labelled_jsonl(str(d / "train.jsonl"), 16, seed=0),
                val_file=labelled_jsonl(str(d / "val.jsonl"), 6, seed=1),
                pooling="attention", window=8, threads=1, progress=False, dropout=0.0,
                load_best=False)


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tiny, tmp_path, name, **kw):
    cfg = TrainConfig.from_dict({**tiny, "out_dir": str(tmp_path / name), **kw})
    return train(cfg), cfg


def _last(out, what="adapter"):
    idx = json.load(open(os.path.join(out, "checkpoints", "index.json")))
    ck = os.path.join(out, "checkpoints", idx["last"][-1])
    f = os.path.join(ck, "adapter", "adapter_model.safetensors") if what == "adapter" else \
        os.path.join(ck, "model.safetensors")
    return load_file(f), json.load(open(os.path.join(ck, "trainer_state.json")))


def test_schedules():
    """HF's get_linear / get_cosine_schedule_with_warmup: 0 -> 1 over the warm-up, then
    linear / half-cosine to 0 at the last step, or constant."""
    assert [lr_factor(s, 10, 4, "linear") for s in (0, 2, 4, 7, 10)] == \
        [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(2, 10, 4, "constant") == 0.5 and lr_factor(9, 10, 4, "constant") == 1.0


def test_scheduler_drives_the_optimizer(tiny, tmp_path):
    res, cfg = _run(tiny, tmp_path, "sched", max_steps=4, lr=0.01, warmup_steps=2,
                    schedule="linear", log_every=1)
    rows = [json.loads(x) for x in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    assert lrs == pytest.approx([0.005, 0.01, 0.005, 0.0])  # lr after each step


def test_grad_accumulation_equals_bigger_batch(tiny, tmp_path):
    a, _ = _run(tiny, tmp_path, "b4", max_steps=3, lr=1e-2, batch_size=4, adam_eps=1e-6)
    b, _ = _run(tiny, tmp_path, "b2x2", max_steps=3, lr=1e-2, batch_size=2, grad_accum=2,
                adam_eps=1e-6)
    wa, sa = _last(tmp_path / "b4")
    wb, sb = _last(tmp_path / "b2x2")
    assert sa["global_batch"] == sb["global_batch"] == 4 and sa["tokens"] == sb["tokens"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def test_early_stopping_with_patience(tiny, tmp_path):
    """lr so small that the validation accuracy cannot move: training stops after `patience`
    evaluations without improvement, long before max_steps; the best checkpoint is kept."""
    res, cfg = _run(tiny, tmp_path, "es", max_steps=40, lr=1e-12, head_lr=1e-12,
                    eval_every=2, patience=2)
    st = res["state"]
    assert st["stopped"].startswith("early stopping") and st["step"] == 6
    assert st["best_step"] == 2 and res["best_checkpoint"].endswith("step-000002")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tiny, tmp_path, precision):
    res, _ = _run(tiny, tmp_path, precision, max_steps=2, lr=1e-2, precision=precision,
                  mode="full")
    w, st = _last(tmp_path / precision, "model")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(v.dtype == torch.float32 for v in w.values())  # fp32 master weights
    if precision == "fp16":
        assert st["scaler"]["scale"] > 0  # GradScaler state is in the checkpoint
    else:
        assert st["scaler"] is None


def test_fgm_keeps_a_frozen_embedding_frozen(tiny, tmp_path):
    res, _ = _run(tiny, tmp_path, "fgm", max_steps=2, lr=1e-2, fgm_epsilon=0.5)
    w, _ = _last(tmp_path / "fgm")
    assert not any("word" in k for k in w)  # never trained, never saved
    emb = res["model"].encoder.word.weight
    assert res["state"]["step"] == 2 and not emb.requires_grad and emb.grad is None
    from mmcore.models import TextEncoder

    assert torch.equal(emb, TextEncoder.from_pretrained(tiny["model"]).word.weight)


def test_full_finetuning_checkpoint_holds_every_tensor(tiny, tmp_path):
    res, _ = _run(tiny, tmp_path, "full", max_steps=1, lr=1e-3, mode="full")
    w, st = _last(tmp_path / "full", "model")
    assert st["mode"] == "full"
    assert "encoder.word.weight" in w and "encoder.layers.1.ff2.weight" in w and "head.weight" in w


def test_long_document_batch_equals_documents_alone(tiny):
    """Long-document mode over a right-padded batch (window attention + global CLS, seqlens =
    the lengths from dynamic padding) gives each document the logits it gets alone."""
    from mmcore.train.data import pad_batch
    from mmcore.train.tasks import get_task

    cfg = TrainConfig.from_dict({**tiny, "labels": ["neg", "pos"], "window": 4})
    torch.manual_seed(0)
    m = get_task("classification")(cfg).build_model().eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1000, 5000, (n,), generator=g).tolist() for n in (37, 9, 22)]
    ids, lengths = pad_batch(docs)
    with torch.no_grad():
        batch = m(ids, lengths)["logits"]
        alone = torch.cat([m(torch.tensor([d]), torch.tensor([len(d)]))["logits"] for d in docs])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
