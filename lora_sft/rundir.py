"""The run directory contract, and the one place that names a run's files:

    .lora_sft-run     the marker, written first: this folder holds a lora_sft run (JSON: version, creation time)
    adapter/          PEFT adapter (adapter_model.safetensors, adapter_config.json), tokenizer, README.md card
    recipe.yaml       the fully resolved recipe, defaults filled in
    manifest.json     library versions, seed, data fingerprint, start and end time
    metrics.jsonl     one JSON object per logged step and per eval
    summary.json      final losses, eval metrics before and after, tokens, speed, peak memory, wall time
    checkpoints/      Trainer checkpoints, written atomically, resumable with `train --resume` (checkpoint.py)
    eval.md           (`eval`) the base / fine-tuned table; its numbers are summary.json `evaluation`
    export/           (`export`) adapter/, merged/, fidelity.json

Only these names are ever removed by `train --overwrite`: a file of the user's inside the folder stays.
eval.md, export/ and summary.json `evaluation` are derived from adapter/ and are removed when a new
adapter is written. An export folder is marked too (`.lora_sft-export`), so an export replaces only
an earlier export.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from .errors import UserError

# The names of everything a run writes (and nothing else: `--overwrite` removes exactly these).
MARKER = ".lora_sft-run"
RECIPE = "recipe.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
EVAL_REPORT = "eval.md"
EXPORT = "export"
ARTIFACTS = (MARKER, RECIPE, MANIFEST, METRICS, SUMMARY, ADAPTER, CHECKPOINTS, EVAL_REPORT, EXPORT)
EXPORT_MARKER = ".lora_sft-export"  # written first into an export folder
MARKER_VERSION = 1

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


def entries(folder: Path, n: int = 2) -> str:
    """The first `n` names in `folder` (folders with a trailing /) and how many more, for messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_writable(target: Path, where: str, key: str) -> None:
    """`target`, a folder to create or fill, can be: not a file, and its nearest existing ancestor takes a
    new folder (probed with an empty folder made and removed at once). Raises UserError, writes nothing."""
    ancestor = target
    try:
        if target.exists() and not target.is_dir():
            raise UserError(f"{where}: {target} is a file, not a folder; set {key} to a folder")
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"{where}: cannot create {target}: {ancestor} is a file, not a folder; set {key} to a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".lora_sft-probe-", dir=ancestor))
    except OSError as e:
        raise UserError(f"{where}: cannot create {target}: {ancestor} does not take new folders ({e.strerror}); set {key} to a folder you can write") from None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.marker = self.root / MARKER
        self.recipe = self.root / RECIPE
        self.manifest = self.root / MANIFEST
        self.metrics = self.root / METRICS
        self.summary = self.root / SUMMARY
        self.adapter = self.root / ADAPTER
        self.checkpoints = self.root / CHECKPOINTS
        self.eval_report = self.root / EVAL_REPORT
        self.export = self.root / EXPORT

    # -- what the folder holds
    def holds_run(self) -> bool:
        """The folder holds a lora_sft run: it has the marker, or (a run from before the marker) a recipe.yaml
        next to a manifest.json that lora_sft wrote. A user's own recipe.yaml does not make a run."""
        if self.marker.is_file():
            return True
        try:
            info = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return False
        return self.recipe.is_file() and isinstance(info, dict) and "data_fingerprint" in info and "lora_sft" in (info.get("versions") or {})

    def finished(self) -> bool:
        return self.summary.is_file()

    def is_empty(self) -> bool:
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    def read_recipe(self) -> dict:
        return yaml.safe_load(self.recipe.read_text())

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())

    # -- writing
    def create(self, recipe_dict: dict, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.mark()  # first: from here on the folder is recognisably a run, whatever else fails
        self.checkpoints.mkdir(exist_ok=True)
        self.write_recipe(recipe_dict)
        self.metrics.write_text("")
        write_json(self.manifest, manifest)

    def mark(self) -> None:
        if not self.marker.is_file():
            from . import __version__

            write_json(self.marker, {"version": MARKER_VERSION, "lora_sft": __version__, "created": now()})

    def write_recipe(self, recipe_dict: dict) -> None:
        self.recipe.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))

    def log(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self, manifest: dict, summary: dict) -> None:
        write_json(self.manifest, manifest)
        write_json(self.summary, summary)

    # -- removing: only what a run wrote
    def remove_run(self) -> None:
        """`--overwrite`: remove every artifact a run writes (ARTIFACTS and their .tmp files), the marker last;
        anything else in the folder (a file of the user's) stays."""
        names = [n for n in ARTIFACTS if n != MARKER] + [f"{n}.tmp" for n in (MARKER, MANIFEST, SUMMARY)] + [MARKER]
        for name in names:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def drop_derived(self) -> None:
        """A new adapter/ is about to be written: eval.md, export/ and summary.json `evaluation` describe the old one."""
        self.eval_report.unlink(missing_ok=True)
        if self.export.is_dir() and not self.export.is_symlink():
            shutil.rmtree(self.export)
        elif self.export.exists() or self.export.is_symlink():
            self.export.unlink()
        if self.summary.is_file():
            summary = json.loads(self.summary.read_text())
            if isinstance(summary, dict) and summary.pop("evaluation", None) is not None:
                write_json(self.summary, summary)


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
