"""lora_sft: QLoRA fine-tuning from a YAML recipe, on one GPU or a laptop."""

__version__ = "0.1.0"
