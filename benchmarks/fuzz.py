"""The fuzzer, run long: `python benchmarks/fuzz.py [-n 500] [--seed 0] [--commands validate,preview,train]`.

Draws cases as tests/test_fuzz.py does (tests/fuzz_inputs.py: random recipes, data rows in every format, file names,
overrides and environment variables) and runs each through the CLI in-process on a tiny random Llama built here,
checking the property: exit 0 or 2, never 1, no traceback, one `error: ...` line per problem, nothing written on
exit 2. Prints how many inputs it tried, the exit codes, and each class of finding once with one example case.
Exit status 1 when anything was found. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import os  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from fuzz_inputs import COMMANDS, cases, run_case, summary_key  # noqa: E402
from helpers import build_tokenizer, save_tiny_llama  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402


def tiny_model(root: Path) -> Path:
    corpus = [
        line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()
    ]
    return save_tiny_llama(root / "tiny-llama", build_tokenizer(corpus))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="cases to try (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="which commands to draw (default all three)")
    parser.add_argument("--show", type=int, default=1, help="example cases printed per class of finding")
    args = parser.parse_args()
    commands = tuple(args.commands.split(","))
    root = Path(tempfile.mkdtemp(prefix="lora_sft-fuzz-"))
    model = tiny_model(root)
    found: dict[str, list] = collections.defaultdict(list)
    codes: collections.Counter = collections.Counter()
    tried = collections.Counter()
    start = time.time()

    @seed(args.seed)
    @settings(
        max_examples=args.n,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(model, commands))
    def one(case):
        outcome = run_case(case, root / "case", root / "cache")
        tried[case.command] += 1
        codes[(case.command, outcome.code)] += 1
        if outcome.problems:
            found[summary_key(outcome)].append((case, outcome))

    one()
    total = sum(tried.values())
    print(
        f"tried {total} inputs in {time.time() - start:.0f} s (seed {args.seed}): "
        + ", ".join(f"{c} {n}" for c, n in sorted(tried.items()))
    )
    print("exit codes: " + ", ".join(f"{c} {code}: {n}" for (c, code), n in sorted(codes.items())))
    print(f"findings: {sum(len(v) for v in found.values())} inputs in {len(found)} classes")
    for key, hits in sorted(found.items(), key=lambda kv: -len(kv[1])):
        print(f"\n[{len(hits)}x] {key}")
        for case, outcome in hits[: args.show]:
            print("  problems: " + "; ".join(outcome.problems))
            print("  stderr: " + outcome.stderr.strip()[-1500:].replace("\n", "\n          "))
            print("  case: " + case.describe().replace("\n", "\n        "))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
