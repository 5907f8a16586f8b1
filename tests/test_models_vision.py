"""VisionEncoder == transformers.CLIPVisionModel on the same (random-config) weights."""
import json
import os

import pytest
import torch
from kit import assert_close

transformers = pytest.importorskip("transformers")

from mmcore.models import CheckpointError, VisionEncoder  # noqa: E402


def _clip_dir(tmp_path, full=False, seed=0):
    torch.manual_seed(seed)
    vc = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              image_size=40, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if full:
        cfg = transformers.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=99), vision_config=vc,
            projection_dim=16)
        model = transformers.CLIPModel(cfg)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vc))
    with torch.no_grad():  # non-trivial LayerNorm / bias values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("full", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_vision_encoder_matches_clip(tmp_path, full):
    hf = _clip_dir(tmp_path, full)
    tower = hf.vision_model if full else hf
    ours = VisionEncoder.from_pretrained(tmp_path)
    pixels = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        h, pooled = ours(pixels)
        ref = tower(pixel_values=pixels)
        tower64 = type(tower)(tower.config).double().eval()
        tower64.load_state_dict(tower.state_dict())
        ref64 = tower64(pixel_values=pixels.double())
    assert_close("last_hidden_state", h, ref64.last_hidden_state, ref.last_hidden_state)
    assert_close("pooler_output", pooled, ref64.pooler_output, ref.pooler_output)


def test_vision_encoder_rejects_wrong_size(tmp_path):
    _clip_dir(tmp_path)
    ours = VisionEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pixels must be"):
        ours(torch.randn(1, 3, 32, 32))


def test_vision_encoder_wrong_shape_in_config(tmp_path):
    _clip_dir(tmp_path)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(os.path.join(tmp_path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        VisionEncoder.from_pretrained(tmp_path)


def test_preprocess_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    from mmcore.models.vision_encoder import preprocess

    a = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype("uint8")
    Image.fromarray(a).save(tmp_path / "x.png")
    x = preprocess([tmp_path / "x.png"], image_size=24)
    assert x.shape == (1, 3, 24, 24) and torch.isfinite(x).all()
