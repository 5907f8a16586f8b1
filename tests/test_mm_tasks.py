"""The multimodal tasks on the trainer (tiny configs): matching (dual encoder + InfoNCE, fused
matcher + hard negatives), retrieval (recall@k / mean rank, report, curves), vqa (with L_vs),
doc_figures (long-document mode + several figures), and the `mmcore train --task retrieval`
offline demo at CI size."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from kit_train import tiny_model_dir
from mmcore.train import TrainConfig, train
from mmcore.train.images import ANSWERS, digits_records
from mmcore.train.tasks import get_task
from mmcore.train.tasks.matching import hard_negatives, pair_auc

TINY_VISION = {"vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "image_size": 16, "patch_size": 4}}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"), hidden=32, layers=1, heads=2)


def _cfg(tmp_path, text_dir, task, **kw):
    base = dict(task=task, model=text_dir, task_options=dict(TINY_VISION), mode="full",
                epochs=1, batch_size=8, lr=1e-3, window=0, progress=False, keep_last=1,
                out_dir=str(tmp_path / task), threads=1)
    opts = kw.pop("task_options", {})
    base["task_options"].update(opts)
    return TrainConfig(**{**base, **kw})


def _digits(kind, n=(32, 16, 16)):
    return digits_records(kind, image_size=16, sizes=n)


def test_hard_negatives_never_pick_a_relevant_item():
    torch.manual_seed(0)
    g = torch.tensor([0, 0, 1, 2, 2, 2])
    same = g[:, None] == g[None, :]
    sim = torch.randn(6, 6)
    for _ in range(20):
        neg = hard_negatives(sim, same)
        assert not same[torch.arange(6), neg].any()
    peaked = torch.full((6, 6), -50.0)
    peaked[0, 4] = peaked[3, 1] = 50.0  # the hardest irrelevant item takes all the mass
    neg = hard_negatives(peaked, same)
    assert int(neg[0]) == 4 and int(neg[3]) == 1
    all_same = torch.ones(3, 3, dtype=torch.bool)  # nothing irrelevant: any other item
    neg = hard_negatives(torch.randn(3, 3), all_same)
    assert (neg != torch.arange(3)).all()
    with pytest.raises(ValueError, match="at least 2"):
        hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_pair_auc_is_mann_whitney():
    pos, neg = torch.tensor([0.9, 0.4, 0.7]), torch.tensor([0.1, 0.4, 0.8, 0.0])
    want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / 12
    assert pair_auc(pos, neg) == pytest.approx(float(want))


def test_dual_encoder_loss_is_info_nce(text_dir, tmp_path):
    """The model's loss is the symmetric InfoNCE of its own normalised embeddings at the
    learnable scale, and the scale gets a gradient."""
    task = get_task("retrieval")(_cfg(tmp_path, text_dir, "retrieval"))
    data = task.prepare(_digits("captions"))
    model = task.build_model()
    b = task.collate(data["train"][:6])
    out = model(**b.inputs)
    t, v = out["text_emb"].detach().double(), out["image_emb"].detach().double()
    s = model.temperature().detach().double()
    logits = s * t @ v.t()
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) +
                  F.cross_entropy(logits.t(), torch.arange(6)))
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    out["loss"].backward()
    assert model.temperature.logit_scale.grad is not None


def test_retrieval_trains_and_reports(text_dir, tmp_path):
    """Retrieval end to end: recall in [0, 1] and monotone in k, mean rank >= 1, a report
    with the random baseline and the class-level rule, the recall curves PNG; and the
    metric the trainer selects the best checkpoint by is the mean recall@1 of both
    directions."""
    cfg = _cfg(tmp_path, text_dir, "retrieval", epochs=2)
    res = train(cfg, _digits("captions"), log=lambda s: None)
    m = res["test"]
    for d in ("t2i", "i2t"):
        r = [m[f"{d}_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 1
        assert 1 <= m[f"{d}_mean_rank"] <= 16
    assert cfg.eval_metric == "mean_recall@1"
    assert m["mean_recall@1"] == pytest.approx((m["t2i_recall@1"] + m["i2t_recall@1"]) / 2)
    rep = res["report"]
    assert rep["relevance"] == "class" and rep["random"]["recall@1"] == pytest.approx(
        sum((torch.tensor([int(r["label"]) for r in _digits("captions")["test"]])
             .bincount().double() ** 2).tolist()) / 16 ** 2)
    assert "digit seven" in res["report_text"] and "random" in res["report_text"]
    assert os.path.isfile(rep["curves"]) and os.path.isfile(os.path.join(cfg.out_dir,
                                                                         "curves.png"))


def test_retrieval_instance_level_from_files(text_dir, tmp_path):
    """User format without labels: each caption's relevant image is its own; the images are
    read from disk."""
    from mmcore.train.images import write_digits_folder

    paths = write_digits_folder(str(tmp_path / "d"), image_size=16, limit=12)
    cfg = _cfg(tmp_path, text_dir, "retrieval", label_field=None, train_file=paths["train"],
               val_file=paths["validation"], test_file=paths["test"])
    res = train(cfg, log=lambda s: None)
    assert res["report"]["relevance"] == "instance"
    assert 0 <= res["test"]["t2i_recall@1"] <= 1


@pytest.mark.parametrize("matcher", ["dual", "fused"])
def test_matching_trains(text_dir, tmp_path, matcher):
    cfg = _cfg(tmp_path, text_dir, "matching", task_options={"matcher": matcher,
                                                              "fusion_heads": 2})
    res = train(cfg, _digits("captions"), log=lambda s: None)
    assert 0 <= res["test"]["pair_accuracy"] <= 1 and 0 <= res["test"]["auc"] <= 1
    assert cfg.eval_metric == "pair_accuracy"


def test_fused_matcher_loss_is_itc_plus_itm_on_the_sampled_negatives(text_dir, tmp_path):
    """loss = InfoNCE + BCE over [B positives, an image negative per caption, a caption
    negative per image], with the negatives hard_negatives draws (same RNG state)."""
    cfg = _cfg(tmp_path, text_dir, "matching", task_options={"matcher": "fused",
                                                              "fusion_heads": 2})
    task = get_task("matching")(cfg)
    data = task.prepare(_digits("captions"))
    model = task.build_model().eval()  # no dropout: two forwards agree
    inp = task.collate(data["train"][:6]).inputs
    torch.manual_seed(5)
    got = model(**inp)["loss"]
    torch.manual_seed(5)
    h_t, h_v, t, v = model.unimodal(inp["input_ids"], inp["lengths"], inp["pixels"])
    g = inp["groups"]
    same = g[:, None] == g[None, :]
    sim = model.temperature() * t @ v.t()
    neg_v = hard_negatives(sim, same)
    neg_t = hard_negatives(sim.t(), same.t())
    ar = torch.arange(6)
    pos = model.match_logits(h_t, inp["lengths"], h_v, ar, ar)
    n1 = model.match_logits(h_t, inp["lengths"], h_v, ar, neg_v)
    n2 = model.match_logits(h_t, inp["lengths"], h_v, neg_t, ar)
    from mmcore.train.losses import info_nce

    itm = -(F.logsigmoid(pos).sum() + F.logsigmoid(-n1).sum() + F.logsigmoid(-n2).sum()) / 18
    want = info_nce(t, v, model.temperature()) + itm
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_vqa_loss_with_visual_consistency(text_dir, tmp_path):
    """loss = CE + w·L_vs, L_vs = mean(1 − cos(P·mean-pooled text, image CLS)), and L_vs sends
    no gradient into the vision tower (the image embedding is the teacher)."""
    cfg = _cfg(tmp_path, text_dir, "vqa", task_options={"vs_weight": 0.7, "fusion_heads": 2},
               labels=list(ANSWERS))
    task = get_task("vqa")(cfg)
    data = task.prepare(_digits("questions"))
    model = task.build_model()
    inp = task.collate(data["train"][:5]).inputs
    out = model(**inp)
    loss, ce, vs = (float(out[k].detach()) for k in ("loss", "ce", "vs_loss"))
    assert loss == pytest.approx(ce + 0.7 * vs, rel=1e-6)
    r = model.reader
    h = r.text(inp["input_ids"], inp["lengths"])
    hv, _ = r.encode_images(inp["pixels"])
    m = (torch.arange(h.shape[1])[None] < inp["lengths"][:, None]).float()[..., None]
    t = model.vs_proj((h * m).sum(1) / m.sum(1))
    want = (1 - (t * hv[:, 0]).sum(-1) / (t.norm(dim=-1) * hv[:, 0].norm(dim=-1))).mean()
    assert vs == pytest.approx(float(want.detach()), rel=1e-5)
    out["vs_loss"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in r.vision.parameters())
    assert model.vs_proj.weight.grad.abs().max() > 0
    res = train(cfg, _digits("questions"), log=lambda s: None)
    assert 0 <= res["test"]["accuracy"] <= 1 and "precision" in res["report_text"]


def test_doc_figures_long_document_mode_with_several_figures(text_dir, tmp_path):
    """Documents longer than the window, 1 or 2 figures each (pixels (B, M, 3, R, R) with
    image counts), read in long-document mode, trained end to end: every part of the model
    (text, vision, fusion, head) gets a gradient."""
    g = torch.Generator().manual_seed(0)
    words = "river stone market lantern winter harbour garden copper".split()

    def rec(i):
        n = 1 + i % 2
        text = " ".join(words[(i * 7 + j) % 8] for j in range(40 + i))
        return {"text": text, "label": ["a", "b"][i % 2],
                "pixels": torch.randn(n, 3, 16, 16, generator=g)}

    records = {"train": [rec(i) for i in range(8)], "validation": [rec(i) for i in range(4)]}
    cfg = _cfg(tmp_path, text_dir, "doc_figures", window=4, pooling="attention",
               task_options={"fusion_heads": 2})
    task = get_task("doc_figures")(cfg)
    data = task.prepare(records)
    b = task.collate(data["train"][:4])
    assert b.inputs["pixels"].shape == (4, 2, 3, 16, 16)
    assert b.inputs["image_counts"].tolist() == [1, 2, 1, 2]
    model = task.build_model()
    assert model.text_kw == {"window": (4, 4), "global_tokens": 1}
    model(**b.inputs)["loss"].backward()
    for part in ("reader.text", "reader.vision", "reader.heads.fusion", "reader.heads.cls_head",
                 "pool"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert any(gr is not None and gr.abs().max() > 0 for gr in grads), part
    res = train(cfg, records, log=lambda s: None)
    assert res["state"]["step"] == 1


def test_bad_task_options_and_records_name_the_problem(text_dir, tmp_path):
    with pytest.raises(ValueError, match="not options of task 'retrieval'"):
        get_task("retrieval")(_cfg(tmp_path, text_dir, "retrieval",
                                   task_options={"matcher": "fused"}))
    with pytest.raises(ValueError, match="matcher"):
        get_task("matching")(_cfg(tmp_path, text_dir, "matching",
                                  task_options={"matcher": "late"}))
    task = get_task("vqa")(_cfg(tmp_path, text_dir, "vqa"))
    with pytest.raises(ValueError, match="exactly one image"):
        task.prepare({"train": [{"text": "x", "label": "a", "images": []},
                                {"text": "y", "label": "b", "images": []}]})
    with pytest.raises(FileNotFoundError, match="nope.png"):
        task.prepare({"train": [{"text": "x", "label": "a", "images": ["nope.png"]}]})


def test_cli_retrieval_demo_ci_size(text_dir, tmp_path, capsys):
    """`mmcore train --task retrieval` with no data files: the demo recipe on the digits
    (here shrunk by flags), printing both directions against the random baseline and the
    class-level rule; --json ends with one JSON object."""
    from mmcore.cli import main

    opts = json.dumps(TINY_VISION)
    rc = main(["train", "--task", "retrieval", "--model", text_dir, "--task-options", opts,
               "--synthetic-sizes", "48,16,32", "--epochs", "1", "--batch-size", "16",
               "--mode", "full", "--out-dir", str(tmp_path / "demo"), "--no-progress",
               "--threads", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "text -> image" in out and "image -> text" in out and "random" in out
    assert "is a hit at k when one of the first k images retrieved shows its class" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert "test_t2i_recall@1" in last and "test_i2t_recall@5" in last
    assert os.path.isfile(tmp_path / "demo" / "retrieval_curves.png")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMCORE_DEMO") != "1",
                    reason="the full retrieval demo takes minutes; kept out of CI "
                           "(MMCORE_DEMO=1 pytest tests/test_mm_tasks.py -k full_demo)")
def test_full_retrieval_demo_reaches_the_target(tmp_path):
    """Issue 14's target, as the README runs it: MiniLM-L6 + the small ViT on the digits,
    text→image recall@1 >= 0.8 on the 360 held-out test digits (random: 0.1)."""
    from mmcore.train.tasks.retrieval import RetrievalTask

    cfg = TrainConfig(task="retrieval", **{**RetrievalTask.demo_defaults,
                                            "out_dir": str(tmp_path / "demo"),
                                            "progress": False})
    res = train(cfg, log=lambda s: None)
    assert res["test"]["t2i_recall@1"] >= 0.8, res["test"]
    assert res["report"]["random"]["recall@1"] < 0.11
