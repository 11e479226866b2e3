"""The data stage: sources -> checked rows -> tokens and labels (packed or not), train and eval.

The pipeline, one module a step: read.py (sources -> rows, each with its `file:line`), formats.py (a row's
fields checked per format), checking.py (`check`: every row checked, shuffled, limited, split, weighted),
chats.py and encode.py (tokens and exact loss masks), tokenized.py (`build`: the tokenized splits, the gate,
packing.py's rows), collate.py (batches), stream.py (data.streaming). cache.py keeps the checked and tokenized
data by what keys.py fingerprints; table.py holds the rows in memory-mapped Arrow files.
"""

from lora_sft.data.checking import Checked, check, options
from lora_sft.data.collate import CausalCollator, collator
from lora_sft.data.keys import cache_key, check_key
from lora_sft.data.tokenized import LENGTH, DataBundle, build, largest_token, lengths

__all__ = [
    "LENGTH",
    "CausalCollator",
    "Checked",
    "DataBundle",
    "build",
    "cache_key",
    "check",
    "check_key",
    "collator",
    "largest_token",
    "lengths",
    "options",
]
