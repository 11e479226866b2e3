"""The tokenized-data cache: one folder per fingerprint under $LORA_SFT_CACHE (default ~/.cache/lora_sft).

Written to a temporary folder and renamed into place, so a crash never leaves a half cache that a
later run would pick up. Bump VERSION when the tokenized layout or the masking rules change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

VERSION = "lora_sft-data-3"  # 2: assistant-first chats mask the header; rows split before weights; 3: a length column


def root() -> Path:
    base = (
        os.environ.get("LORA_SFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_sft"
    )
    return Path(base) / "tokenized"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about a tokenizer that changes its output: vocabulary and rules, specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None), state.pop("padding", None)  # per-call settings a call leaves behind
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        [
            type(tokenizer).__name__,
            tokenizer.chat_template,
            tokenizer.eos_token,
            tokenizer.pad_token,
            tokenizer.bos_token,
            getattr(tokenizer, "add_bos_token", None),
        ],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


@dataclass
class Cached:
    train: Dataset
    eval: Dataset | None
    meta: dict


def load(key: str) -> Cached | None:
    from datasets import load_from_disk

    folder = root() / key
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    # `save` wrote each split as one Dataset (load_from_disk's annotation also covers a DatasetDict)
    evals = cast("Dataset", load_from_disk(str(folder / "eval"))) if (folder / "eval").is_dir() else None
    return Cached(cast("Dataset", load_from_disk(str(folder / "train"))), evals, meta)


def save(key: str, train: Dataset, evals: Dataset | None, meta: dict) -> None:
    final = root() / key
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save_to_disk(str(tmp / "train"))
    if evals is not None:
        evals.save_to_disk(str(tmp / "eval"))
    (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete cache
    try:
        tmp.rename(final)
    except OSError:  # another run cached the same key first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
