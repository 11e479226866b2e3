"""`validate --explain`: every recipe key with its default and docstring, as a Markdown table (also the README's)."""

from __future__ import annotations

from typing import get_args

import yaml
from pydantic import BaseModel

from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import Section


def explain() -> str:
    """Every recipe key with its default and docstring, as a Markdown table (`validate --explain`, the README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = (
                "required"
                if field.is_required()
                else f"`{yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            )
            rows.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', '/')} |")
            # an optional sub-section (`Section | None`, e.g. train.early_stopping): its own keys follow
            inner = [a for a in get_args(ann) if a is not type(None)]
            if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], Section):
                walk(inner[0], f"{prefix}{name}.")

    walk(Recipe, "")
    return "\n".join(rows)
