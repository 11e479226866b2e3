"""One process of tests/test_fsdp.py's FSDP run on CPU processes (gloo), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N tests/fsdp_cpu_worker.py RECIPE OUT MODE

accelerate runs FSDP on CUDA devices only (on CPU processes the Trainer runs DDP), so this wraps the model with
accelerate's own FSDP2 code (`fsdp2_prepare_model`), given the plugin the Trainer would build from lora_sft's
`distributed.fsdp_arguments` and the mixed precision the Trainer asks for; then trains a few steps on fixed
batches (each process its share), gathers and saves the adapter as `train.fit` does, and writes what the test
compares into OUT/result.json. MODE: `sharded`, or `plain` (the same steps in one process, nothing sharded, no
process group: the test calls `main` itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROWS, LENGTH, STEPS = 4, 24, 4


def main(recipe_path: str, out: str, mode: str) -> dict:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import TrainingArguments

    from lora_sft import distributed
    from lora_sft import model as model_stage
    from lora_sft.model.loss import plain_path_reason
    from lora_sft.recipe.load import load_recipe
    from lora_sft.run.rundir import RunDir
    from lora_sft.settings import resolve

    if mode == "sharded":
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode == "sharded" else (0, 1)
    recipe = load_recipe(recipe_path)
    settings = resolve(recipe)
    source = model_stage.resolve_source(recipe)
    plan = model_stage.plan_model(recipe, source, None)
    tokenizer = model_stage.load_tokenizer(recipe, source)
    torch.manual_seed(0)  # the same adapter init in every process
    model = model_stage.add_lora(model_stage.load_base(settings, plan), recipe, plan)
    storage = sorted({str(m.weight.dtype) for m in model.modules() if type(m).__name__ == "Linear4bit"})
    dtype = settings.dtype
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if mode == "sharded":
        arguments = distributed.fsdp_arguments(settings.fsdp)
        args = TrainingArguments(output_dir=str(Path(out) / "trainer"), report_to="none", **arguments)
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        if mixed:
            plugin.set_mixed_precision(mixed)  # what accelerate does for the Trainer's bf16 / fp16
        accelerator = SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=plugin),
            mixed_precision=mixed or "no",
            is_main_process=rank == 0,
            device=torch.device("cpu"),
        )
        model = fsdp2_prepare_model(accelerator, model)
    reason = plain_path_reason(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = torch.randint(3, len(tokenizer) - 1, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    mine = rows.chunk(world)[rank]  # equal shares: the mean of the processes' losses is the loss of all rows
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=dtype, enabled=mode == "plain" and mixed is not None):
            loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
    state = distributed.full_adapter_state(model)  # every process takes part
    result = {"losses": losses, "storage": storage, "plain_path_reason": reason, "gathered": state is not None}
    if rank == 0:
        run_dir = RunDir(Path(out) / "run")
        run_dir.root.mkdir(parents=True)
        run_dir.save_adapter(model, tokenizer, None, state)
        (Path(out) / "result.json").write_text(json.dumps(result))
    if mode == "sharded":
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(*sys.argv[1:4])
