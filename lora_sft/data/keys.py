"""What the data caches are keyed by: the sources' bytes (a fingerprint per source, hashed once while its files'
stat data holds), the data options, the seed, and for the tokenized data the tokenizer. Also where a source sits in
the recipe (`_where`), for the messages about it.
"""

from __future__ import annotations

import hashlib
import json

from lora_sft.data import cache
from lora_sft.data.read import files_of
from lora_sft.data.read import fingerprint as source_fingerprint
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import Source


def _where(recipe: Recipe, split: str, i: int, *key: str) -> str:
    """The recipe place of a split's i-th source: `data.train.2` in a list, plain `data.train` otherwise."""
    return (
        recipe.where("data", split, i, *key)
        if isinstance(getattr(recipe.data, split), list)
        else recipe.where("data", split, *key)
    )


_FINGERPRINTS: dict[str, str] = {}  # a source's fingerprint by its stamp (`_stamp`): hashed once a process
_UNSAVED: dict[str, str] = {}  # fingerprints hashed here that the cache does not know yet (cache.remember_fingerprints)


def _stamp(source: Source, where: str) -> str | None:
    """The source's options and its files' paths, sizes, inodes and times: while it holds, so do the files'
    bytes (as git's index assumes). None for a hub dataset or a file that cannot be read (hashed every time)."""
    try:
        files = files_of(source, where)
        if files is None:
            return None
        stats = [(str(f), (st := f.stat()).st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for f in files]
    except OSError:
        return None
    return json.dumps([source.model_dump_json(), stats])


def _source_fingerprints(recipe: Recipe) -> list[str]:
    out = []
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            where = _where(recipe, split, i)
            stamp = _stamp(source, where)
            if stamp is None:
                out.append(source_fingerprint(source, where))
                continue
            if stamp not in _FINGERPRINTS:
                known = cache.known_fingerprint(stamp) if recipe.data.cache else None
                _FINGERPRINTS[stamp] = known or source_fingerprint(source, where)
                if known is None:
                    _UNSAVED[stamp] = _FINGERPRINTS[stamp]
            out.append(_FINGERPRINTS[stamp])
    return out


def _remember_fingerprints() -> None:
    cache.remember_fingerprints(_UNSAVED)
    _UNSAVED.clear()


def _data_options(recipe: Recipe) -> str:
    # not group_by_length (the order batches are drawn in) nor num_proc: neither changes a token
    return recipe.data.model_dump_json(exclude={"group_by_length", "num_proc"})


def check_key(recipe: Recipe) -> str:
    """What the checked rows depend on: the sources' bytes, the data options, the seed."""
    parts = [cache.VERSION, "checked", str(recipe.seed), _data_options(recipe), *_source_fingerprints(recipe)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(recipe: Recipe, tokenizer) -> str:
    """What the tokenized data depends on: the sources' bytes, the data options, the seed, the tokenizer."""
    parts = [
        cache.VERSION,
        recipe.task,
        str(recipe.seed),
        _data_options(recipe),
        cache.tokenizer_fingerprint(tokenizer),
        *_source_fingerprints(recipe),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
