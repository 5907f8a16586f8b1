"""mmcore.patch(model): swap the attention and LoRA layers of Hugging Face models."""
