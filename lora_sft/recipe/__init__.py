"""The recipe stage: the YAML file as typed, validated sections (schema.py), loaded by load.py."""

from lora_sft.recipe.explain import explain
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import (
    FORMATS,
    DataSection,
    EvalSection,
    HubSection,
    LoraSection,
    ModelSection,
    QuantSection,
    Source,
)
from lora_sft.recipe.training import EarlyStopping, TrainSection, memory_bytes

__all__ = [
    "FORMATS",
    "DataSection",
    "EarlyStopping",
    "EvalSection",
    "HubSection",
    "LoraSection",
    "ModelSection",
    "QuantSection",
    "Recipe",
    "Source",
    "TrainSection",
    "explain",
    "load_recipe",
    "memory_bytes",
]
