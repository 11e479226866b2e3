"""The commands that work on a finished run directory (or an export): export, eval, generate, push.

cli.py hands them their sub-parsers here, so the shared command-line module stays small.
"""

from __future__ import annotations

from .errors import UserError


def _export(args) -> int:
    from .export import export

    export(args.run_dir, merged=args.merged, dtype=args.dtype, out=args.out, samples=args.samples, tolerance=args.tolerance, max_shard_size=args.max_shard_size)
    return 0


def add_run_commands(sub, common) -> None:
    e = sub.add_parser("export", parents=[common], help="export the adapter (and the merged model) with a fidelity report",
                       description="Export a finished run: the adapter in PEFT format with its tokenizer and model card, with --merged also the base (unquantized, --dtype) with the adapter merged in; writes fidelity.json comparing the 4-bit model as trained, the unquantized unmerged model and the merged one, and fails (exit 1) if the merge changed the model beyond the tolerance.")
    e.add_argument("run_dir", help="a run directory that `train` completed")
    e.add_argument("--merged", action="store_true", help="also write the merged model (sharded safetensors)")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="dtype of the unquantized base and the merged weights (default fp32)")
    e.add_argument("--out", help="export folder (default RUN_DIR/export)")
    e.add_argument("--samples", type=int, default=8, help="held-out samples for the fidelity report (default 8)")
    e.add_argument("--tolerance", type=float, help="max |logit diff| allowed between merged and unmerged (default by dtype: fp32 1e-4 + 1e-5 * max |logit|)")
    e.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard of the merged model (default 2GB)")
    e.set_defaults(handler=_export)
