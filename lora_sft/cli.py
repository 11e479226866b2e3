"""Command line: `python -m lora_sft {train,validate} RECIPE [KEY=VALUE ...]`; the commands on a finished run are in commands.py.

Bad input exits 2 with one line per problem, a failed run exits 1; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import RunError, UserError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    recipe_args = argparse.ArgumentParser(add_help=False, parents=[common])
    recipe_args.add_argument("recipe", help="path to a YAML recipe")
    recipe_args.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="patch the recipe, e.g. train.lr=1e-4 lora.rank=8")

    parser = argparse.ArgumentParser(prog="python -m lora_sft", description="QLoRA fine-tuning from a YAML recipe.", parents=[common])
    parser.add_argument("--version", action="version", version=f"lora_sft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[recipe_args], help="train an adapter", description="Train a LoRA adapter as the recipe says; writes the run directory (output_dir).")
    t.add_argument("--resume", nargs="?", const=True, metavar="PATH", help="continue the run in output_dir from its latest checkpoint, or from PATH (a run directory or a checkpoint folder)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    v = sub.add_parser("validate", parents=[recipe_args], help="check a recipe and print what the run would do", description="Check the recipe, its data files and its LoRA targets (model built from its config, no weights loaded), then print what train would do.")
    v.add_argument("--explain", action="store_true", help="also print every recipe key with its default and meaning")
    p = sub.add_parser("preview", parents=[recipe_args], help="show the tokens a run would train on", description="Tokenize the recipe's data (no model weights) and show samples with the trained tokens marked, and the data stats.")
    p.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--json", action="store_true", help="one JSON object per sample: input_ids, labels (-100 = not trained), position_ids when packed")
    from .commands import add_run_commands

    add_run_commands(sub, common)
    return parser


def _validate(args) -> int:
    from .recipe import explain, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from . import plan
    from .train import prepare

    prepared = prepare(recipe, hub_may_be_unreachable=True)  # what train checks first, every problem at once
    print(f"{args.recipe}: ok")
    print("\n".join(f"  {line}" for line in plan.describe_run(recipe, prepared.checked, prepared.plan, prepared.bundle)))
    if prepared.note:
        print(prepared.note)
    if args.explain:
        print("\nrecipe keys:\n" + explain())
    return 0


def _preview(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from . import data, model, preview

    checked = data.check(recipe)
    tokenizer = model.load_tokenizer(recipe, model.resolve_source(recipe))
    bundle = data.build(recipe, tokenizer, checked)
    if args.split == "eval" and bundle.eval is None:
        raise UserError(f"{recipe.where('data')}: there is no eval split; set data.eval or data.eval_fraction")
    preview.show(bundle, tokenizer, args.split, args.n, args.json)
    return 0


def _train(args) -> int:
    from .recipe import load_recipe

    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.lr=1e-4`: argparse took an override for --resume's optional PATH
        args.overrides, args.resume = [*args.overrides, args.resume], True
    recipe = load_recipe(args.recipe, args.overrides)
    from .commands import after_training
    from .train import run

    after_training(recipe, run(recipe, resume=args.resume, overwrite=args.overwrite).run_dir.root)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # bitsandbytes warns at import about an optional CPU inference kernel that training never uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # cache writes are quick; bars only add noise
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        return {"train": _train, "validate": _validate, "preview": _preview}[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except RunError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure of the run, not of the input
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
