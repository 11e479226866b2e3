"""Command line: `python -m lora_sft {train,validate,preview} RECIPE [KEY=VALUE ...]`; the commands on a finished run are in commands.py.

Every sub-command sets its `handler` (set_defaults); `main` calls it.

Bad input exits 2 with one line per problem, a failed run exits 1; tracebacks only with --debug. Under a launcher
(torchrun, accelerate launch) the main process prints an error every process stops with, once (`_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import get_args

from lora_sft import __version__, compat, distributed
from lora_sft.cli.args import ArgumentError, Parser, count, target
from lora_sft.distributed import Elsewhere, finish, shared, start, stop, together, world
from lora_sft.errors import RunError, UserError, one_line


def _parser() -> argparse.ArgumentParser:
    common, recipe_args = _parents()
    parser = Parser(prog="python -m lora_sft", description="QLoRA fine-tuning from a YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"lora_sft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, recipe_args)
    _add_validate(sub, recipe_args)
    _add_preview(sub, recipe_args)
    _add_init(sub, common)
    from lora_sft.cli.commands import add_run_commands

    add_run_commands(sub, common)
    return parser


def _parents() -> tuple[Parser, Parser]:
    """The flags every command takes (--debug), and with them a recipe command's: the recipe and its overrides."""
    # --debug is taken before or after the command; a sub-command's default must not undo the top-level flag
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    recipe_args = Parser(add_help=False, parents=[common])
    recipe_args.add_argument("recipe", help="path to a YAML recipe")
    recipe_args.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="patch the recipe, e.g. train.lr=1e-4 lora.rank=8 (anywhere after the recipe)",
    )
    return common, recipe_args


def _add_train(sub, recipe_args: Parser) -> None:
    t = sub.add_parser(
        "train",
        parents=[recipe_args],
        help="train an adapter",
        description="Train a LoRA adapter as the recipe says; writes the run directory (output_dir).",
    )
    _add_run_dir_flags(t)
    t.add_argument("--quiet", action="store_true", help="print only errors and the end-of-run summary")
    t.set_defaults(handler=_train)


def _add_run_dir_flags(parser: argparse.ArgumentParser) -> None:
    """What to do with a run already in output_dir: train's flags, which validate takes too (it checks the same)."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="PATH",
        help="continue the run in output_dir from its latest checkpoint, or from PATH (a run directory or a checkpoint folder); refused unless the checkpoint has every file an exact resume needs",
    )
    parser.add_argument(
        "--allow-inexact",
        action="store_true",
        help="with --resume: continue from a checkpoint that lacks the optimizer, schedule, random state, token totals or stream position, starting those anew (recorded in manifest.json)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in output_dir: removes only the files a run writes, never other files",
    )


def _add_validate(sub, recipe_args: Parser) -> None:
    v = sub.add_parser(
        "validate",
        parents=[recipe_args],
        help="check a recipe and print what the run would do",
        description="Check everything train checks before it writes anything (the recipe, every data row, the tokenizer and chat template, the tokenized data, the model config, LoRA targets and weight-file headers, output_dir; no weights loaded), then print what train would do.",
    )
    v.add_argument("--explain", action="store_true", help="also print every recipe key with its default and meaning")
    _add_run_dir_flags(v)
    v.add_argument(
        "--nproc",
        type=count(1),
        default=None,
        metavar="N",
        help="plan for N processes (GPUs) under torchrun or accelerate launch: the global batch and the memory per GPU (default: WORLD_SIZE under a launcher, else 1)",
    )
    v.add_argument(
        "--target",
        type=target,
        default=None,
        metavar="MACHINE",
        help="plan for another machine than this one: cuda:24GiB or cuda:8GiB (a GPU of that size, bf16 as RTX 30xx and newer run it), mps:16GiB (an Apple-silicon Mac of that memory), cpu or cpu:32GiB; its compute dtype, its allocator, its memory (default: this machine)",
    )
    v.set_defaults(handler=_validate)


def _add_preview(sub, recipe_args: Parser) -> None:
    p = sub.add_parser(
        "preview",
        parents=[recipe_args],
        help="show the tokens a run would train on",
        description="Tokenize the recipe's data (no model weights) and show samples with the trained tokens marked, and the data stats.",
    )
    p.add_argument("-n", type=count(0), default=3, help="samples to show (default 3)")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per sample: input_ids, labels (-100 = not trained), position_ids when packed",
    )
    p.set_defaults(handler=_preview)


def _add_init(sub, common: Parser) -> None:
    from lora_sft.recipe.schema import Recipe
    from lora_sft.recipe.sections import FORMATS

    i = sub.add_parser(
        "init",
        parents=[common],
        help="write a commented recipe for a model and a data file",
        description="Write a recipe: the data format detected from the file's first rows, the task from the format, sizes for the model (from its config), the memory estimate in a header comment. Never replaces a file.",
    )
    i.add_argument("--model", required=True, metavar="NAME", help="hub id (org/name) or a local model folder")
    i.add_argument("--data", required=True, metavar="FILE", help="the training data: a file, folder or glob")
    i.add_argument("--format", choices=FORMATS, default=None, help="the rows' format (default: detected)")
    i.add_argument(
        "--task",
        choices=get_args(Recipe.model_fields["task"].annotation),
        default=None,
        help="default: classification for classification rows, else causal_lm",
    )
    i.add_argument(
        "--out", default="recipe.yaml", metavar="FILE", help="where to write the recipe (default recipe.yaml)"
    )
    i.set_defaults(handler=_init)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; KEY=VALUE overrides may come anywhere after the recipe (`train r.yaml --overwrite k=v`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        overrides = [a for a in extra if not a.startswith("-")]  # load_recipe says what is wrong with one
        args.overrides = [*args.overrides, *overrides]
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _validate(args) -> int:
    from lora_sft.recipe.explain import explain
    from lora_sft.recipe.load import load_recipe

    _resume_override(args)
    recipe = load_recipe(args.recipe, args.overrides)
    from lora_sft.preflight import describe_plan, prepare
    from lora_sft.run.start import start as decide

    # what train checks first, at once; with --nproc N what train under a launcher of N processes checks
    planned = distributed.planned(args.nproc)
    prepared = prepare(recipe, hub_may_be_unreachable=True, machine=args.target, world=planned)
    # what train would do with a run already in output_dir (refuse, resume, overwrite): the same line train prints
    decide(
        recipe,
        args.resume,
        args.overwrite,
        prepared.bundle.fingerprint if prepared.bundle else None,
        prepared.plan,
        args.allow_inexact,
    )
    if not world().main:  # under a launcher every process checks; the main one prints
        return 0
    print(f"{args.recipe}: ok")
    assert prepared.settings is not None  # the preflight passed
    lines = describe_plan(
        prepared.settings, prepared.checked, prepared.plan, prepared.bundle, prepared.memory, planned.size
    )
    print("\n".join(f"  {line}" for line in lines))
    if prepared.note:
        print(prepared.note)
    if args.explain:
        print("\nrecipe keys:\n" + explain())
    return 0


def _init(args) -> int:
    from lora_sft.cli.scaffold import init

    path = init(args.model, args.data, args.format, args.task, args.out)
    print(f"wrote {path}; check it with: python -m lora_sft validate {path}")
    return 0


def _preview(args) -> int:
    from lora_sft.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from lora_sft import data, model
    from lora_sft.cli import preview

    checked = data.check(recipe)
    tokenizer = model.load_tokenizer(recipe, model.resolve_source(recipe))
    bundle = data.build(recipe, tokenizer, checked)
    if args.split == "eval" and bundle.eval is None:
        raise UserError(f"{recipe.where('data')}: there is no eval split; set data.eval or data.eval_fraction")
    preview.show(bundle, tokenizer, args.split, args.n, args.json)
    return 0


def _resume_override(args) -> None:
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.lr=1e-4`: argparse took an override for --resume's optional PATH
        args.overrides, args.resume = [*args.overrides, args.resume], True


def _train(args) -> int:
    from lora_sft.recipe.load import load_recipe

    _resume_override(args)
    if args.quiet:
        from lora_sft.console import quiet_libraries

        quiet_libraries()
    start()  # under a launcher: from here the processes can wait for each other and share a failure
    recipe = together(load_recipe, args.recipe, args.overrides)
    from lora_sft.train import run

    # training, then the recipe's eval and hub sections, then the summary
    run(recipe, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, allow_inexact=args.allow_inexact)
    finish()  # under a launcher: every process ends together, after the main process has written everything
    return 0


def _end_progress_line() -> None:
    """Close any progress bar still drawn (the training bar an error cut short), so that the error that follows
    starts a line of its own (`grep ^error:` finds it) and no bar is redrawn after it."""
    for bar in compat.open_progress_bars():
        with contextlib.suppress(Exception):  # a bar on a closed stream: nothing to end
            bar.close()


def _quiet_stdout() -> None:
    """The reader of our output went away (`preview ... | head`): send what is left to /dev/null, say nothing."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _report(error: BaseException, lines: list[str], code: int) -> int:
    """Print `error: LINE` for each line, once per run, and return the exit code: under a launcher the main process
    prints an error every process stops with (bad input, which every process finds, or a failure that
    `distributed.agree` shared); another process prints only a failure of its own that the main process cannot know
    of, with its rank."""
    # launcher variables that do not describe a launch cannot say which process speaks: each one does
    me = world() if not distributed.launcher_problems() else distributed.ALONE
    if not me.main and (isinstance(error, UserError) or shared(error)):
        lines = []
    elif not me.main:
        lines = [f"rank {me.rank}: {line}" for line in lines]
    _end_progress_line()
    for line in lines:  # a problem is one line whatever names or library messages it quotes
        print(f"error: {one_line(line)}", file=sys.stderr, flush=True)
    # bad input leaves nothing behind, and `stop` may leave by os._exit, which skips atexit (no data stage ran:
    # nothing to remove, and nothing to import)
    if (table := sys.modules.get("lora_sft.data.table")) is not None:
        table.remove_work_dirs()
    stop(error, code)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except ArgumentError as e:
        return _report(UserError(str(e)), [str(e)], 2)
    # bitsandbytes warns at import about an optional CPU inference kernel that training never uses; on an AVX512-BF16
    # CPU it asks the `kernels` package for that kernel from the hub, which warns in offline mode that it skips its
    # publisher check (kernels 0.19).
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # cache writes are quick; bars only add noise
    try:
        compat.check_versions()  # a library outside the tested range: one line, exit 2, before the command imports it
        distributed.check_launcher()  # RANK, WORLD_SIZE, MASTER_ADDR, ...: a launch, or none, before anything is read
        return args.handler(args)
    except BrokenPipeError:
        _quiet_stdout()
        if args.command in ("preview", "validate"):  # `preview ... | head`: the reader has what it wanted
            return 0
        _end_progress_line()
        print(
            f"error: {args.command} stopped: its output was closed (BrokenPipeError); send it to a file instead of a pipe that closes",
            file=sys.stderr,
        )
        return 1
    except UserError as e:
        if args.debug:
            raise
        return _report(e, e.problems, 2)
    except RunError as e:
        if args.debug:
            raise
        return _report(e, [str(e)], e.code)
    except Elsewhere as e:  # another process failed: the main process prints its error
        return _report(e, [str(e)], e.code)
    except KeyboardInterrupt:
        _end_progress_line()
        if world().main:
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure of the run, not of the input
        if args.debug:
            raise
        return _report(e, [f"{type(e).__name__}: {e} (run again with --debug for the traceback)"], 1)
