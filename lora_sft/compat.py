"""Where lora_sft leans on what its libraries do not promise: their private attributes and modules, and the range of
versions it was tested with.

Every touch of a library's private API is here, as one small function whose comment names the versions it was
checked against; tests/test_compat.py calls each one against the installed libraries, so an upgrade that removes
or renames what one reads fails that test loudly instead of changing a run in silence. The rest of lora_sft calls
these functions and reads no private name of a library itself.

`check_versions` runs first thing in the CLI: a library outside `TESTED` stops the run with one line that says
which range to install (LORA_SFT_SKIP_VERSION_CHECK=1 runs anyway). It reads the installed versions from the
packages' metadata, without importing them, so the CLI still starts quickly.

Only the standard library at import time; each function imports its library when called.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lora_sft.errors import UserError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from peft.tuners.lora.bnb import Linear4bit
    from torch.utils.data import DataLoader
    from transformers import PreTrainedModel, Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

# The tested range of each library lora_sft imports, as pyproject.toml's dependencies state it (a test checks that
# the two agree): the lower bound is the oldest release the tests passed with (.ci/run's "lowest versions" step
# installs exactly these), the upper bound the next minor release, which no test has run with yet. torch: 2.13.0
# (the CPU build) and 2.14.1 (the CUDA build, run on the CPU: the fast subset of .ci/run's lowest-versions step, the
# eval-mode trap test, 60 passed) are the releases tested.
TESTED = {
    "torch": ">=2.13,<2.15",
    "transformers": ">=5.4,<5.26",
    "peft": ">=0.18,<0.22",
    "bitsandbytes": ">=0.48,<0.51",
    "datasets": ">=2.18,<5.3",
    "accelerate": ">=1.3,<1.17",
}
SKIP_VERSION_CHECK = "LORA_SFT_SKIP_VERSION_CHECK"


def _installed(name: str) -> str | None:
    """The installed version of distribution `name` from its metadata (the package is not imported); None when
    it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions(installed: Callable[[str], str | None] | None = None) -> None:
    """UserError, one line per library, for each library in `TESTED` whose installed version lies outside its
    tested range. A library that is not installed, or whose version does not parse, is left to the import that
    needs it. `installed`: name -> version, None when not installed (default: the packages' metadata). Nothing is
    checked when the environment sets LORA_SFT_SKIP_VERSION_CHECK=1."""
    if os.environ.get(SKIP_VERSION_CHECK) == "1":
        return
    installed = installed or _installed
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    problems = []
    for name, spec in TESTED.items():
        found = installed(name)
        if found is None:
            continue
        try:
            inside = SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            continue
        if not inside:
            problems.append(
                f'{name} {found} is outside lora_sft\'s tested range {spec}; pip install "{name}{spec}" (or set {SKIP_VERSION_CHECK}=1 to run with it anyway)'
            )
    if problems:
        raise UserError(problems)


def lowest_pins() -> list[str]:
    """`TESTED`'s lower bounds as pins (`transformers==5.4`), one per library: what .ci/run's lowest-versions step
    installs."""
    lower = {
        name: next(s.removeprefix(">=") for s in spec.split(",") if s.startswith(">=")) for name, spec in TESTED.items()
    }
    return [f"{name}=={version}" for name, version in lower.items()]


# ---------------------------------------------------------------- tqdm


def open_progress_bars() -> list[Any]:
    """The tqdm bars this process has open, when tqdm is imported (tqdm is not imported here). tqdm 4.67: the class
    keeps them in its private WeakSet `tqdm.std.tqdm._instances`."""
    tqdm = sys.modules.get("tqdm.std")
    return list(getattr(getattr(tqdm, "tqdm", None), "_instances", []))


# ---------------------------------------------------------------- datasets


def dataset_fingerprint(dataset: Dataset) -> str:
    """The hash `datasets` keeps of a dataset's content and transforms. datasets 2.18 to 5.2: the private attribute
    `Dataset._fingerprint`; there is no public accessor."""
    return dataset._fingerprint


# ---------------------------------------------------------------- accelerate


def unwrapped_dataloader(loader: Any) -> Any:
    """The loader inside accelerate's wrappers (DataLoaderShard / DataLoaderDispatcher), which is what iterates.
    accelerate 1.3 to 1.16: their attribute `base_dataloader` (DataLoaderAdapter)."""
    while hasattr(loader, "base_dataloader"):  # accelerate's DataLoaderShard / Dispatcher -> what it iterates
        loader = loader.base_dataloader
    return loader


# ---------------------------------------------------------------- transformers: the Trainer


def train_sampling(grouped: bool) -> dict:
    """Trainer's train sampler: length-grouped or shuffled (transformers 5.2 made the group_by_length flag a strategy).
    Probes TrainingArguments' dataclass fields (transformers 5.4 to 5.25)."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def length_grouped_sampler(train_dataloader: DataLoader | None) -> LengthGroupedSampler | None:
    """The LengthGroupedSampler Trainer gave its train dataloader, or None. transformers 5.4 to 5.25: the private
    module `transformers.trainer_pt_utils`; accelerate 1.3 to 1.16: its shard and skip wrappers keep the batch
    sampler as `batch_sampler`, a torch BatchSampler keeps the sampler as `sampler`."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sampler: Any = train_dataloader
    for _ in range(4):  # DataLoader -> BatchSampler (inside accelerate's shard or skip wrappers) -> sampler
        if isinstance(sampler, LengthGroupedSampler):
            return sampler
        sampler = getattr(sampler, "batch_sampler", None) or getattr(sampler, "sampler", None)
    return sampler if isinstance(sampler, LengthGroupedSampler) else None


def group_lengths(sampler: LengthGroupedSampler, batch_size: int, generator: torch.Generator) -> None:
    """Make a LengthGroupedSampler group `batch_size` samples at a time and shuffle with `generator`, its lengths
    held as a list (a `datasets` column read one row at a time is slow). transformers 5.4 to 5.25: `__iter__`
    reads the attributes `lengths`, `batch_size` and `generator`, which Trainer offers no way to set."""
    if not isinstance(sampler.lengths, list):
        sampler.lengths = list(sampler.lengths[:])
    sampler.batch_size = batch_size
    sampler.generator = generator


def smooths_labels(trainer: Trainer) -> bool:
    """Trainer applies label smoothing in its compute_loss (train.label_smoothing_factor). transformers 5.4 to 5.25:
    the attribute `label_smoother`, set in Trainer.__init__."""
    return trainer.label_smoother is not None


def passes_num_items(trainer: Trainer) -> bool:
    """Trainer hands the model `num_items_in_batch` (the model's forward takes loss kwargs), and normalizes the loss
    by it. transformers 5.4 to 5.25: the attribute `model_accepts_loss_kwargs`, set in Trainer.__init__."""
    return bool(trainer.model_accepts_loss_kwargs)


def devices_scale(trainer: Trainer) -> int:
    """What Trainer's compute_loss multiplies a loss normalized by num_items_in_batch by under
    average_tokens_across_devices (transformers 5.24): the processes, or the GPUs of DataParallel. Reads
    `Trainer.get_tp_size` (transformers 5.4 to 5.25)."""
    return trainer.accelerator.num_processes // trainer.get_tp_size() if trainer.args.n_gpu <= 1 else trainer.args.n_gpu


# ---------------------------------------------------------------- transformers: models


def uses_causal_lm_loss(model: torch.nn.Module) -> bool:
    """The model's loss is transformers' own ForCausalLMLoss, no loss function set on the instance. transformers 5.4
    to 5.25: the private module `transformers.loss.loss_utils`, and the `loss_function` setter stores the instance's
    function as `_loss_function`."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return "_loss_function" not in vars(model) and model.loss_function is ForCausalLMLoss


def converts_weights_on_load(model: PreTrainedModel) -> bool:
    """Checkpoints of this architecture are renamed or fused on load (transformers 5's weight conversions), so their
    tensor names are not the model's. transformers 5.4 to 5.25: `transformers.conversion_mapping`'s
    `extract_weight_conversions_for_model`, which 5.3 and older lack."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model

    return bool(extract_weight_conversions_for_model(model))


def ignored_missing_keys(model: PreTrainedModel) -> list[re.Pattern[str]]:
    """The patterns of weights a model's class says a checkpoint may lack. transformers 5.4 to 5.25: the private
    attribute `_keys_to_ignore_on_load_missing` (None, or a set or list of regular expressions)."""
    return [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]


def file_size_bytes(text: str) -> int:
    """A size such as 200KB, 2GB or 1GiB in bytes; ValueError when it is not one. transformers 5.4 to 5.25:
    `transformers.utils.hub.convert_file_size_to_int` (not exported at the top level)."""
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(text)


# ---------------------------------------------------------------- peft


def lora_4bit_layer() -> type[Linear4bit]:
    """peft's LoRA layer around a bitsandbytes Linear4bit. peft 0.18 to 0.21: `peft.tuners.lora.bnb.Linear4bit`,
    not exported from `peft.tuners.lora`."""
    from peft.tuners.lora.bnb import Linear4bit

    return Linear4bit


# ---------------------------------------------------------------- bitsandbytes


def keep_trainable_layout(layer: Any) -> None:
    """Keep a bitsandbytes Linear4bit out of its CPU inference layout: on CPUs with AVX512-BF16, an eval-mode forward
    under no_grad repacks the weight into a layout through which no gradient flows afterwards. bitsandbytes 0.49 to
    0.50: the layer's attribute `support_avx512bf16_for_cpu`; 0.48 has no such layout (the attribute then does
    nothing)."""
    layer.support_avx512bf16_for_cpu = False


def repacked_for_cpu(quant_state: Any) -> bool:
    """A 4-bit weight's quant state says its data was repacked for CPU inference (AVX512-BF16), so dequantize_4bit
    cannot unpack it. bitsandbytes 0.49 to 0.50: the quant state's `packing_format_for_cpu`, absent in 0.48."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def hub_hint(names: str) -> str:
    """What to do when the hub did not give a file: check `names` and the network; or, with the hub switched off
    (HF_HUB_OFFLINE), say so, since then no request was made and the network is not the cause."""
    if variable := offline_variable():
        return f"{variable}={os.environ[variable]} keeps the hub off, so nothing was downloaded; unset it"
    return f"check {names} and the network"


def offline_variable() -> str | None:
    """The environment variable that switches the hub off, read as huggingface_hub does (its constants.py, checked on
    huggingface_hub 1.x): HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE when HF_HUB_OFFLINE is unset or empty; or None.
    Read now, not at import time, so a variable set after huggingface_hub was imported counts too."""
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return name if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") else None


def load_trainer_file(path: str) -> Any:
    """A checkpoint file read as Trainer reads it on resume: torch.load with weights_only, the numpy types of its RNG
    state allowed. transformers 5.4 to 5.25: `trainer_pt_utils.safe_globals`, the context Trainer's _load_rng_state
    loads rng_state.pth in (not part of transformers' documented API)."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)
