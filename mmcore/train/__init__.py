"""mmcore.train: fine-tuning on mmcore's kernels — LoRA / BitFit / full / frozen-encoder+head,
the seed objectives, safetensors checkpoints that resume exactly, torchrun DDP and FSDP2.

    from mmcore.train import TrainConfig, train
    res = train(TrainConfig(train_file="train.jsonl", val_file="val.jsonl", test_file="test.jsonl",
                            mode="lora", target_modules=["q", "v"], lora_bias="lora_only",
                            window=128, out_dir="runs/lora"))
    clf = mmcore.load_run("runs/lora")        # the run dir is the model (run_dir.py)

Building blocks (each usable alone):
    Trainer                  the loop (trainer.py)
    apply_mode, trainable_report      what is trained (modes.py)
    losses                   objectives (losses.py)
    LengthBucketSampler, read_records data (data.py)
    save_checkpoint / load_checkpoint checkpoints (checkpoint.py)
    Task, register_task, get_task     pluggable tasks: model head + collate + metrics
    run_default              the embedded long-document demo (`mmcore train` with no args)
"""
from .config import TrainConfig, read_config_file
from .data import LengthBucketSampler, encode_texts, pad_batch, read_records
from .modes import apply_mode, trainable_parameters, trainable_report
from .run import load_records, train
from .tasks import Batch, Task, get_task, register_task, task_names
from .trainer import Trainer, seed_everything

__all__ = ["TrainConfig", "read_config_file", "train", "load_records", "Trainer",
           "seed_everything", "apply_mode", "trainable_report", "trainable_parameters",
           "Task", "Batch", "register_task", "get_task", "task_names", "LengthBucketSampler",
           "read_records", "encode_texts", "pad_batch", "run_default"]


def __getattr__(name):
    if name == "run_default":
        from .default import run_default

        return run_default
    raise AttributeError(f"module 'mmcore.train' has no attribute {name!r}")
