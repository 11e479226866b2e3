"""lora_sft.compat: the version check, and every private API it reads, against the installed libraries.

- a library outside the tested range stops the CLI with one line and exit 2 (a fake version, in process and through
  a fake distribution on PYTHONPATH); the normal start passes the check;
- the tested ranges are pyproject.toml's dependency bounds, and .ci/run's lowest-versions step installs their lower
  bounds;
- each compat function still finds what it reads in the installed transformers, peft, bitsandbytes, datasets,
  accelerate and tqdm: an upgrade that removes or renames one fails here, loudly, instead of changing a run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lora_sft import compat
from lora_sft.cli.main import main
from lora_sft.errors import UserError

pytestmark = pytest.mark.unit

LINE = (
    "transformers 4.57.1 is outside lora_sft's tested range {spec}; "
    'pip install "transformers{spec}" (or set LORA_SFT_SKIP_VERSION_CHECK=1 to run with it anyway)'
)


def _inside(name: str) -> str:
    """A version inside the tested range: the lower bound."""
    return next(p.split("==")[1] for p in compat.lowest_pins() if p.startswith(f"{name}=="))


def _fake(**versions):
    return lambda name: versions.get(name, _inside(name))


# ---------------------------------------------------------------- the version check


def test_a_version_outside_the_range_is_one_line(monkeypatch):
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK, raising=False)
    with pytest.raises(UserError) as e:
        compat.check_versions(_fake(transformers="4.57.1"))
    assert e.value.problems == [LINE.format(spec=compat.TESTED["transformers"])]
    with pytest.raises(UserError) as e:  # one line per library, each naming its own range
        compat.check_versions(_fake(transformers="4.57.1", torch="2.99.0"))
    assert [p.split(" ")[:2] for p in e.value.problems] == [["torch", "2.99.0"], ["transformers", "4.57.1"]]


def test_the_bounds_the_next_release_and_what_cannot_be_checked(monkeypatch):
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK, raising=False)
    upper = {name: spec.split("<")[1] for name, spec in compat.TESTED.items()}
    compat.check_versions(_fake())  # every lower bound
    compat.check_versions(_fake(torch="2.13.0+cpu"))  # a local build of a tested release
    compat.check_versions(lambda name: None)  # nothing installed: left to the imports
    compat.check_versions(_fake(transformers="not a version"))
    for name, version in upper.items():
        for outside in (version, f"{version}.0.dev0", f"{version}.1"):  # the next minor release, its previews too
            with pytest.raises(UserError, match=f"^{name} {outside} is outside"):
                compat.check_versions(_fake(**{name: outside}))
    monkeypatch.setenv(compat.SKIP_VERSION_CHECK, "1")
    compat.check_versions(_fake(transformers="4.57.1"))


def test_the_cli_stops_first_with_the_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK, raising=False)
    monkeypatch.setattr(compat, "_installed", _fake(transformers="4.57.1"))
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2  # the version, not the missing recipe
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: " + LINE.format(spec=compat.TESTED["transformers"])]


def _cli(tmp_path, env: dict) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k != compat.SKIP_VERSION_CHECK} | env
    return subprocess.run(
        [sys.executable, "-m", "lora_sft", "validate", str(tmp_path / "missing.yaml")],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_fake_distribution_outside_the_range_and_the_normal_start(tmp_path):
    # a transformers 4.57.1 distribution (metadata only) first on sys.path: importlib.metadata finds it first
    fake = tmp_path / "site"
    (fake / "transformers-4.57.1.dist-info").mkdir(parents=True)
    (fake / "transformers-4.57.1.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: transformers\nVersion: 4.57.1\n"
    )
    out = _cli(tmp_path, {"PYTHONPATH": str(fake)})
    assert (out.returncode, out.stderr.splitlines()) == (
        2,
        ["error: " + LINE.format(spec=compat.TESTED["transformers"])],
    )
    out = _cli(tmp_path, {"PYTHONPATH": str(fake), compat.SKIP_VERSION_CHECK: "1"})
    assert out.returncode == 2 and "outside lora_sft's tested range" not in out.stderr
    assert "recipe file not found" in out.stderr
    # the installed libraries: the check passes, and the recipe is what is wrong
    out = _cli(tmp_path, {})
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: {tmp_path / 'missing.yaml'}: recipe file not found"
    ]


def test_the_tested_ranges_are_pyprojects_bounds():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounds = {(r := Requirement(line)).name: r.specifier for line in project["dependencies"]}
    assert {name: bounds.get(name) for name in compat.TESTED} == {
        name: SpecifierSet(spec) for name, spec in compat.TESTED.items()
    }
    for name, spec in compat.TESTED.items():  # a lower and an upper bound, each
        assert sorted(s.operator for s in SpecifierSet(spec)) == ["<", ">="], name
    assert compat.lowest_pins() == [f"{name}=={spec.split(',')[0][2:]}" for name, spec in compat.TESTED.items()]
    assert "lowest_pins" in (REPO / ".ci/run").read_text()  # the CI step installs these, not a copy of them


def test_the_installed_versions_are_inside_the_ranges():
    from importlib import metadata

    for name, spec in compat.TESTED.items():
        assert SpecifierSet(spec).contains(Version(metadata.version(name)), prereleases=True), name


# ---------------------------------------------------------------- the private APIs, against the installed libraries


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_open_progress_bars():
    from tqdm.std import tqdm  # type: ignore[import-untyped]

    with open(os.devnull, "w") as sink:
        bar = tqdm(total=3, file=sink)
        try:
            assert bar in compat.open_progress_bars()
        finally:
            bar.close()
    assert bar not in compat.open_progress_bars()


def test_dataset_fingerprint():
    import datasets

    dataset = datasets.Dataset.from_dict({"text": ["a", "b"]})
    fingerprint = compat.dataset_fingerprint(dataset)
    assert isinstance(fingerprint, str) and fingerprint
    assert compat.dataset_fingerprint(dataset.map(lambda row: {"text": row["text"] * 2})) != fingerprint


def test_unwrapped_dataloader():
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    wrapped = prepare_data_loader(DataLoader(list(range(8)), batch_size=2), num_processes=1, process_index=0)
    assert type(wrapped) is not DataLoader
    inner = compat.unwrapped_dataloader(wrapped)
    assert type(inner) is DataLoader and [b.tolist() for b in inner] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """Two real Trainers on a tiny Llama: one length-grouped with label smoothing, one plain."""
    import datasets
    from transformers import Trainer, TrainingArguments

    lengths = [3, 9, 1, 7, 5, 12, 2, 10, 4, 8, 6, 11, 14, 13, 15, 16]
    train = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "length": lengths})
    made = []
    for grouped in (True, False):
        args = TrainingArguments(
            output_dir=str(tmp_path_factory.mktemp("trainer")),
            per_device_train_batch_size=2,
            length_column_name="length",
            label_smoothing_factor=0.1 if grouped else 0.0,
            report_to="none",
            use_cpu=True,
            **compat.train_sampling(grouped),
        )
        made.append(Trainer(model=_tiny_llama(), args=args, train_dataset=train))
    return made, lengths


def test_trainer_attributes(trainers):
    (grouped, plain), _ = trainers
    assert (compat.smooths_labels(grouped), compat.smooths_labels(plain)) == (True, False)
    assert compat.passes_num_items(plain)  # a Llama's forward takes the loss kwargs
    assert compat.devices_scale(plain) == 1


def test_length_grouped_sampler_is_found_and_regrouped(trainers):
    from torch.utils.data import DataLoader
    from transformers.trainer_pt_utils import LengthGroupedSampler

    (grouped, plain), lengths = trainers
    assert compat.length_grouped_sampler(plain.get_train_dataloader()) is None
    assert compat.length_grouped_sampler(DataLoader(list(range(4)))) is None
    sampler = compat.length_grouped_sampler(grouped.get_train_dataloader())  # inside accelerate's wrappers
    assert isinstance(sampler, LengthGroupedSampler)

    def order(batch_size: int, seed: int) -> list[int]:
        compat.group_lengths(sampler, batch_size, torch.Generator().manual_seed(seed))
        assert isinstance(sampler.lengths, list)
        return list(sampler)

    # one group of every sample: the order is by length, the longest first, whatever the seed
    assert order(len(lengths), 0) == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert order(2, 0) == order(2, 0) != order(2, 1)  # the generator draws the order


def test_causal_lm_loss():
    model = _tiny_llama()
    assert compat.uses_causal_lm_loss(model)
    model.loss_function = lambda *args, **kwargs: torch.tensor(0.0)
    assert not compat.uses_causal_lm_loss(model)


def test_weight_conversions_and_ignored_missing_keys():
    from transformers import MixtralConfig, MixtralForCausalLM

    llama = _tiny_llama()
    assert not compat.converts_weights_on_load(llama)
    config = MixtralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    assert compat.converts_weights_on_load(MixtralForCausalLM(config))  # its experts are fused on load
    assert hasattr(llama, "_keys_to_ignore_on_load_missing")
    assert compat.ignored_missing_keys(llama) == []
    llama._keys_to_ignore_on_load_missing = [r"lm_head\.weight"]
    assert [p.pattern for p in compat.ignored_missing_keys(llama)] == [r"lm_head\.weight"]


def test_file_size_bytes():
    assert compat.file_size_bytes("2GB") == 2 * 10**9
    assert compat.file_size_bytes("1GiB") == 2**30
    assert compat.file_size_bytes("200KB") == 200 * 10**3
    with pytest.raises(ValueError):
        compat.file_size_bytes("two gigabytes")


def test_lora_4bit_layer():
    from peft.tuners.lora import LoraLayer

    assert issubclass(compat.lora_4bit_layer(), LoraLayer)


def _linear_4bit():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    return layer.eval()


def _eval_forward(layer) -> None:
    """The forward that repacks on an AVX512-BF16 CPU; its kernel may be missing here, the repack happens first."""
    with torch.no_grad(), contextlib.suppress(Exception):
        layer(torch.randn(2, 64))


def test_the_4bit_cpu_layout():
    import bitsandbytes as bnb

    if Version(bnb.__version__) < Version("0.49"):
        pytest.skip("bitsandbytes 0.48 has no CPU inference layout")
    layer = _linear_4bit()
    assert "support_avx512bf16_for_cpu" in vars(layer)
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on an AVX512-BF16 CPU
    _eval_forward(layer)
    assert compat.repacked_for_cpu(layer.weight.quant_state)
    layer = _linear_4bit()
    compat.keep_trainable_layout(layer)
    _eval_forward(layer)
    assert not compat.repacked_for_cpu(layer.weight.quant_state)


def test_load_trainer_file_reads_an_rng_state_as_trainer_saves_it(tmp_path):
    """Trainer's rng_state.pth holds numpy's state, which torch.load with weights_only refuses without the allowance
    Trainer itself loads it under; a truncated file still fails (what `checkpoint.gaps` reports)."""
    import numpy as np

    path = tmp_path / "rng_state.pth"
    torch.save({"python": (3, (1, 2), None), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    loaded = compat.load_trainer_file(str(path))
    assert torch.equal(loaded["cpu"], torch.random.get_rng_state()) and loaded["numpy"][0] == "MT19937"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception):  # noqa: B017 (torch raises OSError or RuntimeError for a cut-off zip)
        compat.load_trainer_file(str(path))
