"""Export on a tiny trained Llama: the adapter and merged exports, the fidelity report, and loading both with plain libraries."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_sft.cli.main import main
from lora_sft.export.fidelity import Outputs, compare
from lora_sft.export.merge import _fidelity_batch
from lora_sft.export.reopen import open_run
from lora_sft.export.report import samples_words, serving_warnings


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run_dir, _, _ = tiny_run
    out = tmp_path_factory.mktemp("export")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["export", str(run_dir), "--merged", "--dtype", "fp32", "--out", str(out), "--max-shard-size", "200KB"]
        )
    assert code == 0
    return run_dir, out, printed.getvalue()


@pytest.mark.e2e
def test_merged_export_is_the_trained_model_and_reports_the_quantization_gap(exported):
    _, out, printed = exported
    report = json.loads((out / "fidelity.json").read_text())
    # at least --samples (8) rows and 512 scored tokens: the tiny eval split, then train rows (marked)
    eval_rows = len(open_run(report["run_dir"]).bundle().eval)
    assert report["passed"] and report["positions"] >= 512 and report["samples"] >= 8
    assert report["samples"] - report["train_samples"] == min(report["samples"], eval_rows)
    assert report["held_out"] == (report["train_samples"] == 0)
    d_c, a_c, a_b = report["pairs"]["d_vs_c"], report["pairs"]["a_vs_c"], report["pairs"]["a_vs_b"]
    assert "b_vs_c" not in report["pairs"]  # merged onto the dequantized weights (d), the default, not onto (b)
    # fp32 rounding of W + BA vs W x + B(A x): the export's own bound, 1e-4 + 1e-5 * max |logit|
    assert d_c["max_abs_logit_diff"] <= report["tolerance"] <= 1e-4 + 1e-5 * 50, (d_c, report["tolerance"])
    assert d_c["greedy_agreement"] == 1.0 and d_c["mean_kl"] < 1e-6
    # the export, loaded back with plain transformers, is the 4-bit model as trained
    assert a_c["max_abs_logit_diff"] <= 1e-4 and a_c["greedy_agreement"] == 1.0
    assert abs(report["perplexity"]["a"] - report["perplexity"]["c"]) / report["perplexity"]["a"] < 1e-5
    # the 4-bit model as trained is not the unquantized one: the gap is measured and shown, not hidden
    assert a_b["max_abs_logit_diff"] > 1e-2 and a_b["mean_kl"] > 0 and set(a_b) == set(a_c)
    onto = report["merge_onto"]
    assert onto["exported"] == "dequantized" and onto["data"] == samples_words(
        report["samples"], report["train_samples"]
    )
    assert onto["dequantized"]["max_abs_logit_diff"] == a_c["max_abs_logit_diff"]
    assert onto["original"]["max_abs_logit_diff"] > 1e-2 and onto["original"]["greedy_agreement"] < 1.0
    assert report["loaded_plain"]["adapter"]["vs_b"]["max_abs_logit_diff"] <= 1e-5
    assert not report["loaded_plain"]["merged"]["lora_sft_imported"]
    assert "a_vs_c: max |logit diff|" in printed and "<- quantization gap" in printed and "peak memory" in printed
    assert "merged onto the dequantized weights: the default:" in printed
    memory = report["merged_export"]
    assert memory["peak_memory_mb"] > 0 and memory["shards"] >= 2 and memory["weights_mb"] > 0

    merged = out / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == memory["shards"]
    assert not any("lora_" in k for k in index["weight_map"]), "merged weights must hold no adapter tensors"
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"
    assert (merged / "generation_config.json").is_file()
    for folder in (merged, out / "adapter"):
        assert (folder / "chat_template.jinja").read_text().startswith("{% for message in messages %}")
        card = (folder / "README.md").read_text()
        # the base is a local folder: no base_model metadata (it takes a hub id), its name in the text, no placeholder link
        assert (
            card.startswith("---\nlibrary_name: ") and "base_model:" not in card and "https://github.com/" not in card
        )
        assert "The base model is a local folder, `tiny-llama" in card
        assert "## Fidelity" in card and "| d_vs_c |" in card and "## Serving" in card
        # which weights the merged model was merged onto, and why, with both merges side by side
        assert (
            "## Merge\n\nThe merged model was merged onto the **dequantized** weights: the default: merged onto the 4-bit weights dequantized as in training, so the export is the model that was trained and evaluated"
            in card
        )
        assert "| dequantized (exported) | " in card and "| original | " in card
        assert (
            '"evaluation": {' in card and "## Recipe" in card
        )  # the eval section's results, and the recipe as trained
    assert (out / ".lora_sft-export").is_file() and not list(
        out.parent.glob(f".{out.name}.*")
    )  # marked; no staging left
    assert "library_name: peft" in (out / "adapter/README.md").read_text()
    assert "library_name: transformers" in (merged / "README.md").read_text()


@pytest.mark.e2e
def test_exports_load_with_plain_transformers_and_peft(exported, tmp_path):
    """A fresh interpreter without lora_sft loads the merged folder and base + adapter: the merged model gives the
    logits of the 4-bit model as trained, the adapter on the unquantized base those of that base + adapter."""
    run_dir, out, _ = exported
    run = open_run(run_dir)
    batch = run.collate(list(run.bundle().eval.select(range(4))))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        unmerged = run.model("fp32")(**inputs).logits
        trained = run.model()(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        merged = AutoModelForCausalLM.from_pretrained({str(out / "merged")!r}).eval()
        base = AutoModelForCausalLM.from_pretrained({run.plan.source.path!r}, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, {str(out / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save({{"merged": merged(**inputs).logits, "adapter": adapted(**inputs).logits}}, {str(tmp_path / "logits.pt")!r})
        assert not any(m.startswith("lora_sft") for m in sys.modules), "lora_sft was imported"
    """)
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits["merged"] - trained).abs().max().item() <= 1e-4
    assert (logits["adapter"] - unmerged).abs().max().item() <= 1e-5


@pytest.mark.e2e
def test_merge_report_losses_equal_an_independent_computation(exported):
    """merge_onto's losses are the models' own loss (transformers' loss from labels) on the report's samples: the
    model as trained, the export loaded back (dequantized) and the merge onto the original weights."""
    from transformers import AutoModelForCausalLM

    run_dir, out, _ = exported
    onto = json.loads((out / "fidelity.json").read_text())["merge_onto"]
    run = open_run(run_dir).unpacked()
    batch, _ = _fidelity_batch(run, 8)  # the report's samples
    models = {
        "trained": run.model(),
        "dequantized": AutoModelForCausalLM.from_pretrained(out / "merged"),
        "original": run.model("fp32").merge_and_unload(),
    }
    for name, model in models.items():
        with torch.no_grad():
            loss = model.eval()(**batch).loss.item()
        assert onto[name]["loss"] == pytest.approx(loss, rel=1e-5), name
        assert onto[name]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5), name
    assert onto["original"]["loss"] != pytest.approx(onto["trained"]["loss"], rel=1e-3)


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.e2e
def test_export_fails_when_the_merge_changes_the_model(exported, tmp_path, capsys):
    """A failed check writes nothing: no folder at a new --out (nor the parents made for it), and an earlier export
    stays byte for byte with no staging folder beside it; the printed report still shows the numbers. The check
    compares the merged model with what was merged: (d) onto the dequantized weights, (b) with --onto original."""
    run_dir, previous, _ = exported
    before = snapshot(previous)
    for out, kept, onto, unmerged in (
        (tmp_path / "new" / "export", "nothing was written", [], "d"),
        (previous, "the earlier export there is unchanged", ["--onto", "original"], "b"),
    ):
        args = ["export", str(run_dir), "--merged", "--dtype", "fp32", *onto, "--tolerance", "1e-9", "--out", str(out)]
        assert main(args) == 1
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert (
            len(err) == 1
            and f"the merged model differs from the unmerged one ({unmerged} vs c)" in err[0]
            and "tolerance 1e-09" in err[0]
        )
        assert err[0].endswith(f"; {kept} ({out}); the report is printed above")
        assert f"{unmerged}_vs_c: max |logit diff|" in captured.out and "tolerance 1e-09" in captured.out
        # what was merged onto shows in the distance to the model as trained
        to_trained = float(re.search(r"a_vs_c: max \|logit diff\| ([^,]+),", captured.out).group(1))
        assert to_trained > 1e-2 if onto else to_trained <= 1e-4
        assert not list(out.parent.glob(f".{out.name}.*")), "a staging folder was left behind"
    assert not (tmp_path / "new").exists(), "a merged model that failed its check must not be left to ship"
    assert snapshot(previous) == before


@pytest.mark.e2e
def test_export_replaces_only_an_earlier_export_and_checks_its_flags_first(tiny_run, tmp_path, capsys):
    from lora_sft.errors import UserError
    from lora_sft.export.merge import export
    from lora_sft.export.options import ExportOptions

    run_dir, _, _ = tiny_run
    out = tmp_path / "export"
    with pytest.raises(UserError, match="--max-shard-size: '2XB' is not a size"):  # before any model is loaded
        export(run_dir, ExportOptions(merged=True, out=out, max_shard_size="2XB"))
    assert not out.exists()
    assert main(["export", str(run_dir), "--samples", "2", "--out", str(out)]) == 0
    assert (out / ".lora_sft-export").is_file() and (out / "fidelity.json").is_file() and not (out / "merged").exists()
    (out / "notes.md").write_text("the user's")
    (out / "adapter" / "my-eval.txt").write_text("the user's too")
    earlier = json.loads((out / ".lora_sft-export").read_text())["created"]
    # an earlier export: what it wrote is replaced, the user's files in it stay
    assert main(["export", str(run_dir), "--samples", "2", "--out", str(out)]) == 0
    assert (out / "notes.md").read_text() == "the user's"
    assert (out / "adapter" / "my-eval.txt").read_text() == "the user's too"
    assert json.loads((out / ".lora_sft-export").read_text())["created"] != earlier
    assert sorted(p.name for p in out.iterdir()) == [".lora_sft-export", "adapter", "fidelity.json", "notes.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left, inside or beside
    capsys.readouterr()
    (out / "merged").mkdir()
    (out / "merged" / "config.json").write_text("{}")  # where --merged writes a file: the user's is not replaced
    before = snapshot(tmp_path)
    assert main(["export", str(run_dir), "--merged", "--samples", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert err == [
        f"error: --out {out}: {out / 'merged' / 'config.json'} is in the way: lora_sft did not write it and would replace it; move it out of {out}, or give --out a new folder (or leave it out to write {run_dir / 'export'})"
    ]
    assert snapshot(tmp_path) == before
    (out / ".lora_sft-export").unlink()
    (out / "fidelity.json").unlink()  # now a folder of someone else's files
    before = snapshot(tmp_path)
    assert main(["export", str(run_dir), "--samples", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().split("\n") == [
        f"error: --out {out}: the folder is not empty (adapter/, merged/ and 1 more) and holds no lora_sft export; an export replaces only an earlier export: give --out a new folder, or leave it out to write {run_dir / 'export'}"
    ]
    assert snapshot(tmp_path) == before


@pytest.mark.e2e
def test_a_link_at_the_runs_export_folder_that_points_nowhere_is_kept_and_refused(tiny_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    (run_dir / "export").symlink_to(tmp_path / "disk" / "export")  # a bigger disk, not mounted now
    before = snapshot(tmp_path)
    assert main(["export", str(run_dir), "--samples", "2"]) == 2
    assert capsys.readouterr().err.strip().split("\n") == [
        f"error: {run_dir / 'export'}: is a link to {tmp_path / 'disk' / 'export'}, which does not exist; create that folder, or give --out a folder"
    ]
    assert snapshot(tmp_path) == before and (run_dir / "export").is_symlink()


@pytest.mark.unit
def test_fidelity_measures():
    torch.manual_seed(0)
    logits = torch.randn(50, 11)
    targets = torch.randint(0, 11, (50,))
    targets[::7] = -100
    ref = Outputs(logits, targets)
    same = compare(ref, Outputs(logits.clone(), targets))
    assert same == {
        "max_abs_logit_diff": 0.0,
        "mean_kl": pytest.approx(0.0, abs=1e-7),
        "perplexity_change": 0.0,
        "perplexity_change_relative": 0.0,
        "greedy_agreement": 1.0,
    }
    shifted = compare(ref, Outputs(logits + 3.0, targets))  # a constant shift changes logits, not the distribution
    assert (
        shifted["max_abs_logit_diff"] == pytest.approx(3.0)
        and shifted["mean_kl"] == pytest.approx(0.0, abs=1e-6)
        and shifted["greedy_agreement"] == 1.0
    )
    flipped = logits.clone()
    flipped[:10] = -flipped[:10]
    changed = compare(ref, Outputs(flipped, targets))
    assert changed["mean_kl"] > 0.1 and changed["greedy_agreement"] <= 0.8 + 1e-6 and changed["perplexity_change"] != 0


@pytest.mark.unit
def test_serving_warnings_give_reasons():
    plain = {
        "r": 16,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
    }
    assert serving_warnings(plain) == []
    cases = {
        "modules_to_save": ({"modules_to_save": ["classifier"]}, "classifier"),
        "DoRA": ({"use_dora": True}, "magnitude"),
        "rank 24": ({"r": 24}, "--max-lora-rank 32"),
        "rank 1024": ({"r": 1024}, "stops at 512"),
        "target modules embed_tokens": ({"target_modules": ["q_proj", "embed_tokens"]}, "refuse or ignore"),
        "bias=all": ({"bias": "all"}, "--enable-lora-bias"),
    }
    for start, (change, reason) in cases.items():
        warnings = serving_warnings(plain | change)
        assert len(warnings) == 1 and warnings[0].startswith(start) and reason in warnings[0], warnings


@pytest.mark.unit
def test_run_commands_have_help_and_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    for command in ("export", "eval", "generate"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0 and "RUN_DIR" in capsys.readouterr().out.upper()
        assert main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: {tmp_path}: not a finished run directory (recipe.yaml is missing); pass the output_dir of a run that `train` completed"
        ]
    assert not any(tmp_path.iterdir()), "a refused command must write nothing"


@pytest.mark.unit
def test_onto_is_checked_before_anything_is_loaded(tmp_path, capsys):
    """A bad --onto value, or --onto without --merged: one line naming the flag, exit 2, nothing written."""
    assert main(["export", str(tmp_path), "--merged", "--onto", "4bit"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: python -m lora_sft export: argument --onto: invalid choice: '4bit' (choose from 'dequantized', 'original') (see python -m lora_sft export --help)"
    ]
    assert main(["export", str(tmp_path), "--onto", "original"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --onto original: says what the merged model is merged onto, and there is none without --merged; add --merged or leave --onto out"
    ]
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
def test_merge_report_says_which_data_and_which_merge_scores_better():
    """Without an eval split the losses are on train rows and the report says so; the `why` names the better merge."""
    from types import SimpleNamespace

    from lora_sft.export.merge import FidelitySamples, _onto_report

    torch.manual_seed(0)
    targets = torch.randint(0, 5, (12,))
    trained = torch.randn(12, 5)
    outputs = {"a": Outputs(trained, targets), "c": Outputs(trained + 1e-6, targets)}
    worse = Outputs(trained + torch.randn(12, 5), targets)  # the original merge, further from (a)
    run = SimpleNamespace(recipe=SimpleNamespace(task="classification"))
    report = _onto_report(run, "dequantized", outputs, {"original": worse}, FidelitySamples(held_out=False, samples=12))
    assert report["data"] == "12 train rows (the run has no eval split: not held out)"
    assert report["exported"] == "dequantized" and set(report["original"]) == set(report["dequantized"])
    ce = torch.nn.functional.cross_entropy
    assert report["original"]["loss"] == pytest.approx(ce(worse.logits, targets).item())
    assert report["trained"]["perplexity"] == pytest.approx(math.exp(ce(trained, targets).item()))
    assert report["original"]["label_agreement"] == (worse.logits.argmax(-1) == trained.argmax(-1)).float().mean()
    lower = report["dequantized"]["loss"] <= report["original"]["loss"]
    assert lower and "loss on the 12 train samples" in report["why"] and "lower than" in report["why"]
    swapped = _onto_report(
        run, "original", {**outputs, "c": worse}, {"dequantized": outputs["c"]}, FidelitySamples(12, False)
    )
    assert swapped["why"].startswith("chosen with --onto original") and swapped["why"].endswith(
        "(confirm it with a larger --samples; --onto dequantized exports that one)"
    )
