"""The model stage: a frozen (4-bit by default) base with LoRA adapters on the layers the recipe picks.

`source` finds the model and reads its config; `tokenizer` loads its tokenizer with the chat template; `plan`
works on a weightless copy built from the config (what `validate` uses); `load` + `lora` build the real thing.
Both resolve the LoRA targets with the same `plan.resolve_targets`, and `add_lora` checks that peft adapted exactly
those modules. `planner` (memory) and `loss` sit beside them. This face hands on the names the other stages use.
"""

from lora_sft.model.load import load_adapter, load_base, quantization_config
from lora_sft.model.lora import MUTATING_INITS, InitBatches, add_lora, init_problems, save_initial
from lora_sft.model.plan import ModelPlan, check_weights, plan_model, plan_tokens
from lora_sft.model.source import ConfigUnusable, ModelSource, ModelUnreachable, resolve_source, task_class
from lora_sft.model.tokenizer import added_token_ids, is_one_token, load_tokenizer

__all__ = [
    "MUTATING_INITS",
    "ConfigUnusable",
    "InitBatches",
    "ModelPlan",
    "ModelSource",
    "ModelUnreachable",
    "add_lora",
    "added_token_ids",
    "check_weights",
    "init_problems",
    "is_one_token",
    "load_adapter",
    "load_base",
    "load_tokenizer",
    "plan_model",
    "plan_tokens",
    "quantization_config",
    "resolve_source",
    "save_initial",
    "task_class",
]
