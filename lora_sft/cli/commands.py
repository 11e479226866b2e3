"""The commands that work on a run directory (or an export): export, eval, generate, push, plot.

main.py hands them their sub-parsers here, so the shared command-line module stays small.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lora_sft.cli.args import count, shard_size, tolerance
from lora_sft.errors import UserError
from lora_sft.run.rundir import RunDir


def _export(args) -> int:
    from lora_sft.export.merge import export
    from lora_sft.export.options import ExportOptions

    options = ExportOptions(
        merged=args.merged,
        dtype=args.dtype,
        out=args.out,
        samples=args.samples,
        tolerance=args.tolerance,
        max_shard_size=args.max_shard_size,
        onto=args.onto,
        gguf=args.gguf_type or ("f16" if args.gguf else None),
        max_drift=args.max_drift,
    )
    with RunDir(args.run_dir).writer("export"):  # one writer per run directory: a train or eval of it waits
        export(args.run_dir, options)
    return 0


def _eval(args) -> int:
    from lora_sft.export.evaluation import evaluate_run

    with RunDir(args.run_dir).writer("eval"):  # eval.md and summary.json: one writer per run directory
        evaluate_run(args.run_dir, data_file=args.data, base=args.base)
    return 0


def _push(args) -> int:
    from lora_sft.export.hub import push

    push(args.folder, args.repo_id, private=not args.public, revision=args.revision, dry_run=args.dry_run)
    return 0


def _generate(args) -> int:
    from lora_sft.export.evaluation import generate_text, prompt_for
    from lora_sft.export.reopen import open_run

    run = open_run(args.run_dir)
    if run.recipe.task != "causal_lm":
        raise UserError(
            f"{args.run_dir}: generate needs a causal_lm run (this one is {run.recipe.task}); use `eval` to measure a classifier"
        )
    model = run.model()
    if args.prompt is not None:
        prompt, chat = prompt_for(run.recipe, run.tokenizer, [{"role": "user", "content": args.prompt}])
        print(generate_text(model, run.tokenizer, prompt, args.max_new_tokens, chat))
        return 0
    # A chat: every turn is rendered with the saved chat template, the whole history each time.
    history: list[dict] = []
    print("chat with the fine-tuned model; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        prompt, chat = prompt_for(
            run.recipe, run.tokenizer, history
        )  # a text-only run continues the last line as raw text
        reply = generate_text(model, run.tokenizer, prompt, args.max_new_tokens, chat)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def _plot(args) -> int:
    from lora_sft.run.plots import plot

    plot(args.run_dirs, out=args.out, metric=args.metric)
    return 0


Command = Callable[..., argparse.ArgumentParser]  # adds a sub-command on a run directory (or a folder)


def add_run_commands(sub, common) -> None:
    """Add export, eval, generate, push and plot to `sub`, each taking the `common` flags (--debug)."""

    def command(name: str, handler, help: str, description: str, target: str = "run_dir"):
        parser = sub.add_parser(name, parents=[common], help=help, description=description)
        parser.add_argument(
            target, help="a run directory that `train` completed" if target == "run_dir" else "the folder to upload"
        )
        parser.set_defaults(handler=handler)
        return parser

    _add_export(command)
    _add_eval(command)
    _add_generate(command)
    _add_push(command)
    _add_plot(sub, common)


def _add_export(command: Command) -> None:
    e = command(
        "export",
        _export,
        "export the adapter (and the merged model) with a fidelity report",
        "Export a finished run: the adapter in PEFT format with its tokenizer and model card, with --merged also the base in --dtype with the adapter merged in (onto the 4-bit weights dequantized as trained, or with --onto original onto the unquantized ones); writes fidelity.json comparing the 4-bit model as trained, the unquantized unmerged model and the merged one (and both merges), and fails (exit 1) if the merge changed the model beyond the tolerance.",
    )
    e.add_argument("--merged", action="store_true", help="also write the merged model (sharded safetensors)")
    e.add_argument(
        "--onto",
        choices=["dequantized", "original"],
        help="with --merged, merge the adapter onto: dequantized (default), the 4-bit weights as trained, so the merged model is the one trained and evaluated; or original, the base's unquantized weights; fidelity.json compares both",
    )
    e.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the unquantized base and the merged weights (default 16-bit: bf16 where the base's config is bf16, else fp16; fp32 merges without rounding)",
    )
    e.add_argument("--out", help="export folder (default RUN_DIR/export)")
    e.add_argument(
        "--samples",
        type=count(1),
        default=8,
        help="held-out samples for the fidelity report, at least (default 8; causal LMs: as many more as make 512 tokens, train rows when the eval split is small)",
    )
    e.add_argument(
        "--tolerance",
        type=tolerance,
        help="max |logit diff| allowed between merged and unmerged (default: by dtype, fp32 1e-4 + 1e-5 x max |logit|, fp16 1e-2 + 1e-2 x, bf16 5e-2 + 5e-2 x, plus twice the dtype's measured rounding of the trained model)",
    )
    e.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="2GB",
        help="largest safetensors shard of the merged model (default 2GB)",
    )
    e.add_argument(
        "--gguf",
        action="store_true",
        help="also write gguf/NAME-TYPE.gguf for llama.cpp / Ollama and an Ollama Modelfile, checked for serving parity in llama.cpp (implies --merged)",
    )
    e.add_argument(
        "--gguf-type",
        metavar="TYPES",
        help="GGUF weight types, comma-separated: f16 (default), bf16, q8_0, q6_k, q5_k_m, q4_k_m; or auto (with --max-drift): the smallest that stays within the drift budget (implies --gguf)",
    )
    e.add_argument(
        "--max-drift",
        type=tolerance,
        help="with --gguf-type auto: the largest mean KL divergence (nats per token, held-out) from the model as trained that a GGUF may have",
    )


def _add_eval(command: Command) -> None:
    v = command(
        "eval",
        _eval,
        "measure a finished run (and its base) on held-out data",
        "Evaluate a finished run on its eval split or --data FILE: loss, perplexity, token accuracy and generation metrics (causal_lm) or accuracy and macro F1 (classification); writes eval.md and adds `evaluation` to summary.json. Works offline.",
    )
    v.add_argument("--data", help="a data file in the run's format to evaluate on, instead of the eval split")
    v.add_argument(
        "--base", action="store_true", help="also measure the base model without the adapter (before/after table)"
    )


def _add_generate(command: Command) -> None:
    g = command(
        "generate",
        _generate,
        "try a fine-tuned causal LM: one prompt, or a chat",
        "Generate with a finished causal_lm run (4-bit base + adapter, as trained), the prompt rendered with the saved chat template. Without --prompt: an interactive chat.",
    )
    g.add_argument("--prompt", help="one user message; omit for an interactive chat")
    g.add_argument("--max-new-tokens", type=count(1), default=128, help="longest reply in tokens (default 128)")


def _add_push(command: Command) -> None:
    p = command(
        "push",
        _push,
        "upload a folder to the model hub",
        "Upload a folder (a run's adapter/, an export, a run directory without its checkpoints) to a hub model repository, creating it if needed. The token comes from HF_TOKEN or the saved login and is never written anywhere; HF_ENDPOINT selects another hub.",
        target="folder",
    )
    p.add_argument("--repo-id", required=True, help="USER/NAME (or NAME in your namespace)")
    p.add_argument(
        "--public",
        action="store_true",
        help="create the repository public (it is created private by default; an existing repository keeps its visibility)",
    )
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument(
        "--dry-run", action="store_true", help="list the files and sizes that would be uploaded, upload nothing"
    )


def _add_plot(sub, common) -> None:
    pl = sub.add_parser(
        "plot",
        parents=[common],
        help="plot a metric of one or more runs against step",
        description="Draw a metric from each run's metrics.jsonl against the optimizer step, one line per run labelled with its name (the run directory's folder name); works on a run still training. Each run directory also has its own loss.png (train and eval loss, learning rate), redrawn at every checkpoint.",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (the output_dir of `train` runs)")
    pl.add_argument("--out", help="the image to write: .png, .svg or .pdf (default ./plot.png)")
    pl.add_argument(
        "--metric",
        default="loss",
        help="any metric in metrics.jsonl: loss, eval_loss, learning_rate, grad_norm, eval_accuracy, ... (default loss)",
    )
    pl.set_defaults(handler=_plot)
