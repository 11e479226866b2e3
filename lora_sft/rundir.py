"""The run directory contract:

    adapter/          PEFT adapter (adapter_model.safetensors, adapter_config.json), tokenizer, README.md card
    recipe.yaml       the fully resolved recipe, defaults filled in
    manifest.json     library versions, seed, data fingerprint, start and end time
    metrics.jsonl     one JSON object per logged step and per eval
    summary.json      final losses, eval metrics before and after, tokens, speed, peak memory, wall time
    checkpoints/      Trainer checkpoints, written atomically, resumable with `train --resume` (checkpoint.py)
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

LIBRARIES = ("lora_sft", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "evaluate", "pydantic")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    from . import __version__

    out = {"python": platform.python_version(), "lora_sft": __version__}
    for lib in LIBRARIES[1:]:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.adapter = self.root / "adapter"
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"

    def create(self, recipe_dict: dict, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        (self.root / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
        self.metrics.write_text("")
        write_json(self.root / "manifest.json", manifest)

    def log(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, manifest: dict, summary: dict) -> None:
        write_json(self.root / "manifest.json", manifest)
        write_json(self.root / "summary.json", summary)


def manifest(seed: int, fingerprint: str, data_stats: dict, model_source: str) -> dict:
    return {
        "started": now(),
        "ended": None,
        "command": sys.argv,
        "seed": seed,
        "data_fingerprint": fingerprint,
        "data": data_stats,
        "model_source": model_source,
        "versions": versions(),
    }


def model_card(recipe: dict, base: str, data_stats: dict, summary: dict, labels: list[str] | None) -> str:
    task = recipe["task"]
    tags = ["lora", "qlora", "peft", "lora_sft", "text-classification" if task == "classification" else "text-generation"]
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    label_args = f", num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}" if labels else ""
    results = {k: summary.get(k) for k in ("eval_before", "eval", "train_loss", "eval_loss")}
    if summary.get("evaluation"):  # what `eval` measured, without its sample generations
        results["evaluation"] = {k: v for k, v in summary["evaluation"].items() if k != "samples"}
    from . import __version__

    # `base_model` is hub metadata: a hub id, never a path that exists only on the training machine.
    # A local folder (the rule model.resolve_source applies: the path exists) is named in the text instead.
    local = Path(base).expanduser().exists()
    name = Path(base).name if local else base
    metadata = "" if local else f"base_model: {base}\n"
    origin = f" The base model is a local folder, `{name}`, not a hub model." if local else ""
    load_from = f"path/to/{name}" if local else base
    return f"""---
{metadata}library_name: peft
tags: {json.dumps(tags)}
---

# LoRA adapter for {name}

Trained with lora_sft {__version__} ({recipe['quant']['mode']} base, LoRA rank {recipe['lora']['rank']}, task `{task}`).{origin}

## Data

{data_stats['train']['rows']} train samples ({data_stats['train']['trained_tokens']} trained tokens), {data_stats['eval']['rows']} eval samples.

## Results

```json
{json.dumps(results, indent=2)}
```

## Use it

```python
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

base = {auto}.from_pretrained("{load_from}"{label_args})
model = PeftModel.from_pretrained(base, "path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
