"""What a run would do, worked out without loading weights (`validate` prints it; `train` checks it first)."""

from __future__ import annotations

import math

from .recipe import Recipe


def train_steps(recipe: Recipe, rows: int) -> int:
    """Optimizer steps over `rows` training rows (samples, or packed rows), counted as the Trainer does."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    per_epoch = max(math.ceil(math.ceil(rows / t.micro_batch_size) / t.grad_accum), 1)
    return math.ceil(t.epochs * per_epoch)


def describe_run(recipe: Recipe, checked, plan, bundle=None) -> list[str]:
    """Lines saying what `train` would do with this recipe; `plan` and `bundle` (the tokenized data) are
    None when the model is unreachable, and the step count then comes from the rows before tokenizing."""
    d, t, q, lo = recipe.data, recipe.train, recipe.quant, recipe.lora
    eval_from = f"from {', '.join(s.path for s in d.sources('eval'))}" if d.eval else f"{d.eval_fraction:.0%} of train, seed {recipe.seed}" if d.eval_fraction else "none"
    batch = t.micro_batch_size * t.grad_accum
    # the Trainer steps through what was tokenized: packed rows, text chunks, samples left after dropping
    steps = train_steps(recipe, len(bundle.train) if bundle is not None else len(checked.train))
    quant = "unquantized" if q.mode == "none" else q.mode + (" + double quant" if q.double_quant and q.mode != "int8" else "")
    lines = [f"task: {recipe.task}"]
    if plan is not None:
        lines.append(f"model: {recipe.model.path} ({plan.source.origin}: {plan.source.path})")
        lines.append(f"quantization: {quant}, compute dtype {q.compute_dtype}; kept unquantized: {', '.join(plan.heads) or 'nothing'}")
        leaves = sorted({n.rsplit('.', 1)[-1] for n in plan.targets})
        lines.append(f"lora: rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}{', rslora' if lo.rslora else ''}{', dora' if lo.dora else ''} on {len(plan.targets)} modules ({', '.join(leaves)})")
        if plan.modules_to_save:
            lines.append(f"trained in full: {', '.join(plan.modules_to_save)}")
        lines.append(f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)")
    formats = ", ".join(sorted(d.formats()))
    data_line = f"data: {formats}{', packed' if d.packing else ''}, {len(checked.train)} train rows, {len(checked.eval)} eval rows ({eval_from}), max_length {d.max_length}"
    if bundle is not None and d.packing and "packed_rows" in bundle.stats.get("train", {}):
        data_line += f", packed into {bundle.stats['train']['packed_rows']} rows"
    if checked.labels:
        data_line += f", labels: {', '.join(checked.labels)}"
    lines.append(data_line)
    lines.append(f"training: {steps} steps ({'max_steps' if t.max_steps else f'{t.epochs:g} epochs'}), batch {batch} ({t.micro_batch_size} x {t.grad_accum} accumulated), lr {t.lr:g} {t.scheduler}, {t.optimizer}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}")
    lines.append(f"output: {recipe.output_dir}")
    return lines
