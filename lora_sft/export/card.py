"""The model cards: the adapter's README.md that a run writes (`write_card`, rendered from the run directory's
records once everything it reports exists, the eval section's results included) and what `export` adds to it:
the fidelity and merge sections, the measured "Use it" snippets, and the merged model's own card.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lora_sft.distributed import main_only
from lora_sft.export.options import ONTO
from lora_sft.export.reopen import FinishedRun
from lora_sft.export.report import samples_words
from lora_sft.model.lora import MUTATING_INITS
from lora_sft.run.records import Evaluation
from lora_sft.run.rundir import ADAPTER_CONFIG, RunDir, read_json, write_atomic

# ---------------------------------------------------------------- the run's card


@main_only
def write_card(run_dir: RunDir, labels: list[str] | None) -> None:
    """adapter/README.md, rendered from what the run wrote: recipe.yaml, manifest.json, summary.json (with the
    eval section's results when it ran). Called last, once all of these exist."""
    card = render_card(run_dir, labels)
    write_atomic(run_dir.card, lambda tmp: tmp.write_text(card))  # in one step: a link there is replaced, not followed


def render_card(run_dir: RunDir, labels: list[str] | None) -> str:
    recipe = run_dir.read_recipe()
    summary = run_dir.read_summary()
    config = run_dir.adapter / ADAPTER_CONFIG
    added = config.is_file() and bool(read_json(config).get("trainable_token_indices"))
    return model_card(recipe, run_dir.read_manifest()["data"], summary.to_json() if summary else {}, labels, added)


def model_card(
    recipe: dict, data_stats: dict, summary: dict, labels: list[str] | None, added_tokens: bool = False
) -> str:
    """The adapter's README.md from the saved recipe, the manifest's data stats and summary.json: results, the
    eval table (when the eval section or `eval` ran), how to load it (`added_tokens`: the run added special
    tokens, so the base needs rows for them before peft loads the adapter), the recipe."""
    task = recipe["task"]
    base = recipe["model"]["path"]
    tags = [
        "lora",
        "qlora",
        "peft",
        "lora_sft",
        "text-classification" if task == "classification" else "text-generation",
    ]
    results, table = _results(summary)
    from lora_sft import __version__

    # `base_model` is hub metadata: a hub id, never a path that exists only on the training machine.
    # A local folder (the rule model.resolve_source applies: the path exists) is named in the text instead.
    local = Path(base).expanduser().exists()
    name = Path(base).name if local else base
    metadata = "" if local else f"base_model: {base}\n"
    origin = f" The base model is a local folder, `{name}`, not a hub model." if local else ""
    load_from = f"path/to/{name}" if local else base
    saved_rank = _saved_rank(recipe["lora"])
    return f"""---
{metadata}library_name: peft
tags: {json.dumps(tags)}
---

# LoRA adapter for {name}

Trained with lora_sft {__version__} ({recipe["quant"]["mode"]} base, LoRA rank {recipe["lora"]["rank"]}{saved_rank}, task `{task}`).{origin}

## Data

{data_stats["train"]["rows"]} train samples ({data_stats["train"]["trained_tokens"]} trained tokens), {data_stats["eval"]["rows"]} eval samples.

## Results

```json
{json.dumps(results, indent=2)}
```
{table}
## Use it

```python
{_adapter_code(task, load_from, labels, added_tokens)}
```

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""


def _saved_rank(lora: dict) -> str:
    """What the card says of an init that rewrites the base (pissa, olora): adapter/ is saved converted."""
    init = lora.get("init")
    if init not in MUTATING_INITS:
        return ""
    return f", init {init}: saved as a rank-{2 * lora['rank']} LoRA for the original base"


def _results(summary: dict) -> tuple[dict, str]:
    """The card's results (summary.json's losses and eval metrics, and what `eval` measured without its sample
    generations) and its Evaluation section (empty before an evaluation)."""
    results = {k: summary.get(k) for k in ("eval_before", "eval", "train_loss", "eval_loss")}
    if not summary.get("evaluation"):
        return results, ""
    results["evaluation"] = {k: v for k, v in summary["evaluation"].items() if k != "samples"}
    evaluation = Evaluation.from_json(summary["evaluation"])
    table = (
        "\n## Evaluation\n\n"
        + f"{evaluation.rows} held-out samples ({evaluation.data}).\n\n"
        + "\n".join(evaluation.table())
        + "\n"
    )
    return results, table


def _adapter_code(task: str, load_from: str, labels: list[str] | None, added_tokens: bool) -> str:
    """The card's snippet loading the base and the adapter with plain transformers + peft."""
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    label_args = f", num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}" if labels else ""
    grow = (
        'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")\n'
        "# the run added special tokens: the base needs embedding rows for them before the adapter loads\n"
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:\n"
        "    base.resize_token_embeddings(len(tokenizer))\n"
        if added_tokens
        else ""
    )
    return (
        f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f'base = {auto}.from_pretrained("{load_from}"{label_args})\n'
        f'{grow}model = PeftModel.from_pretrained(base, "path/to/adapter")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")'
    )


# ---------------------------------------------------------------- what `export` adds


def export_cards(run: FinishedRun, report: dict, merged: bool) -> tuple[str, str | None]:
    """The export's cards: the run's own card (adapter/README.md) with the export's sections and its measured
    "Use it", and (`merged`) the merged model's card."""
    card = render_card(run.dir, run.checked.labels)
    sections = _sections(report)
    snippets = use_it(run, report, merged)
    return (
        _with_use_it(card, snippets) + "\n" + sections,
        _with_use_it(_merged_card(card, run.recipe.task, sections), snippets) if merged else None,
    )


def _sections(report: dict) -> str:
    lines = [
        "## Fidelity",
        "",
        f"{samples_words(report['samples'], report.get('train_samples', 0))}, {report['positions']} scored positions, tolerance {report['tolerance']:.3g} ({report.get('tolerance_rule', '')}); "
        f"(a) {report['models']['a']}, (b) {report['models']['b']}"
        + (f", (c) {report['models']['c']}" if "c" in report["models"] else "")
        + ".",
        "",
        "| pair | max abs logit diff | mean KL | perplexity change | greedy agreement |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pair, m in report["pairs"].items():
        lines.append(
            f"| {pair} | {m['max_abs_logit_diff']:.3g} | {m['mean_kl']:.3g} | {m['perplexity_change']:+.4g} | {m['greedy_agreement']:.4f} |"
        )
    if "merge_onto" in report:
        lines += ["", *_merge_section(report["merge_onto"])]
    if report.get("gguf"):
        from lora_sft.export.gguf import card_section

        lines += ["", card_section(report["gguf"]).rstrip("\n")]
    lines += ["", "## Serving", ""]
    lines += [f"- warning: {w}" for w in report["serving_warnings"]] or [
        "No known refusal by vLLM-style adapter servers."
    ]
    return "\n".join(lines) + "\n"


def _merge_section(onto: dict) -> list[str]:
    """The card's account of the merge: which weights the exported model was merged onto, why, and both merges
    against the model as trained."""
    agreement = next(k for k in onto["dequantized"] if k.endswith("_agreement"))
    lines = [
        "## Merge",
        "",
        f"The merged model was merged onto the **{onto['exported']}** weights: {onto['why']}.",
        "",
        f"Measured on {onto['data']}:",
        "",
        f"| merged onto | max abs logit diff to the trained model | {agreement.replace('_', ' ')} | loss | perplexity |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in ONTO:
        m = onto[mode]
        name = f"{mode} (exported)" if mode == onto["exported"] else mode
        lines.append(
            f"| {name} | {m['max_abs_logit_diff']:.3g} | {m[agreement]:.4f} | {m['loss']:.4f} | {m['perplexity']:.4f} |"
        )
    trained = onto["trained"]
    lines.append(
        f"| (the model as trained: 4-bit base + adapter) | 0 | 1 | {trained['loss']:.4f} | {trained['perplexity']:.4f} |"
    )
    return lines


def _base_reference(run: FinishedRun) -> tuple[str, str]:
    """What a snippet passes to from_pretrained for the base, and a comment line when it needs one."""
    source, name = run.plan.source, run.recipe.model.path
    if source.gguf is not None:
        return (
            source.path,
            f"# the GGUF base ({source.gguf.name}) as the model folder lora_sft converted it to: transformers loads a\n"
            "# GGUF itself (gguf_file=) only unquantized, and cannot give it a BitsAndBytesConfig\n",
        )
    if Path(name).expanduser().exists():
        return f"path/to/{Path(name).name}", ""
    return name, ""


HEAD = "from transformers import AutoModelForCausalLM, AutoTokenizer"  # the snippets' import line


def use_it(run: FinishedRun, report: dict, merged: bool) -> str | None:
    """The cards' "Use it" section of a causal LM: the ways to load the export, closest to the model as trained
    first, each with its measured distance (max |logit diff|, greedy agreement on the fidelity samples)."""
    if run.recipe.task != "causal_lm":
        return None
    base, note = _base_reference(run)
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[report["dtype"]]
    adapter = _adapter_lines(run)
    options = []
    if "adapter_4bit" in report["loaded_plain"]:
        code = _quantized_code(run, base, note, adapter)
        options.append(
            (
                report["loaded_plain"]["adapter_4bit"]["vs_a"],
                f"the base in {run.recipe.quant.mode} as trained + the adapter",
                code,
            )
        )
    if merged:
        code = f'import torch\n{HEAD}\n\nmodel = AutoModelForCausalLM.from_pretrained("path/to/merged", dtype={dtype})\ntokenizer = AutoTokenizer.from_pretrained("path/to/merged")'
        options.append((report["pairs"]["a_vs_c"], f"the merged model ({report['dtype']})", code))
    code = f'import torch\nfrom peft import PeftModel\n{HEAD}\n\n{note}base = AutoModelForCausalLM.from_pretrained("{base}", dtype={dtype})\n{adapter}'
    options.append((report["pairs"]["a_vs_b"], f"the unquantized base ({report['dtype']}) + the adapter", code))
    options.sort(key=lambda o: o[0]["max_abs_logit_diff"])
    lines = [
        "## Use it",
        "",
        f"Closest to the model as trained first (measured by the export on {samples_words(report['samples'], report.get('train_samples', 0))}):",
        "",
    ]
    for i, (m, what, code) in enumerate(options, 1):
        lines += [
            f"{i}. {what}: max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy agreement {m['greedy_agreement']:.4f}",
            "",
            "```python",
            code,
            "```",
            "",
        ]
    return "\n".join(lines)


def _adapter_lines(run: FinishedRun) -> str:
    """The snippets' lines loading the adapter (and its tokenizer) onto `base`."""
    if json.loads((run.adapter / ADAPTER_CONFIG).read_text()).get("trainable_token_indices"):
        return (
            'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")\n'
            "# the run added special tokens: the base needs embedding rows for them before the adapter loads\n"
            "base.resize_token_embeddings(len(tokenizer))\n"
            'model = PeftModel.from_pretrained(base, "path/to/adapter")'
        )
    return 'model = PeftModel.from_pretrained(base, "path/to/adapter")\ntokenizer = AutoTokenizer.from_pretrained("path/to/adapter")'


def _quantized_code(run: FinishedRun, base: str, note: str, adapter: str) -> str:
    """The snippet loading the base quantized as trained (the run's BitsAndBytesConfig) + the adapter."""
    q = run.recipe.quant
    settings = (
        "load_in_8bit=True"
        if q.mode == "int8"
        else f'load_in_4bit=True,\n    bnb_4bit_quant_type="{q.mode}",\n    bnb_4bit_use_double_quant={q.double_quant},\n    bnb_4bit_compute_dtype={run.settings.dtype},'
    )
    return (
        f"import torch\nfrom peft import PeftModel\n{HEAD}, BitsAndBytesConfig\n\n"
        f"quantization = BitsAndBytesConfig(\n    {settings}\n    llm_int8_skip_modules={run.plan.heads!r},\n)\n"
        f'{note}base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=quantization)\n{adapter}'
    )


def _with_use_it(card: str, section: str | None) -> str:
    """`card` with its "## Use it" section (up to "## Recipe") replaced by `section`."""
    if section is None or "## Use it" not in card:
        return card
    before, rest = card.split("## Use it", 1)
    return before + section + "\n## Recipe" + rest.split("## Recipe", 1)[1]


def _merged_card(adapter_card: str, task: str, sections: str) -> str:
    """The merged model's card from the adapter's: its base_model metadata (absent for a local base) and body."""
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    header, body = adapter_card.removeprefix("---\n").split("\n---\n", 1)
    base_line = next((line + "\n" for line in header.splitlines() if line.startswith("base_model: ")), "")
    title = next(line for line in body.splitlines() if line.startswith("# LoRA adapter for "))
    body = body.replace(title, f"# {title.removeprefix('# LoRA adapter for ')} with a LoRA adapter merged in", 1)
    body = (
        body.split("## Use it")[0]
        + f"""## Use it

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("path/to/merged")
tokenizer = AutoTokenizer.from_pretrained("path/to/merged")
```

"""
        + "## Recipe"
        + body.split("## Recipe", 1)[1]
    )
    tags = ["lora_sft", "merged-lora", "text-classification" if task == "classification" else "text-generation"]
    return f"---\n{base_line}library_name: transformers\ntags: {json.dumps(tags)}\n---\n{body}\n{sections}"
