"""Custom code a model repository ships; running it without model.trust_remote_code would be a hole."""

import os
from pathlib import Path

Path(os.environ.get("LORA_SFT_REMOTE_CODE_MARKER", "/dev/null")).write_text("executed")

from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil"
