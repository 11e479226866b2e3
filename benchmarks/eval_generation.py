"""How fast the eval section generates: the held-out prompts of a chat run answered by the base and the fine-tuned
model as `eval` generates them (evaluation.generator: on CPU the 4-bit weights dequantized, the adapter merged, in
fp32; batches of GENERATE_BATCH), and a few of them through bitsandbytes' 4-bit layers as trained, one prompt at a
time (what eval did before), to show the difference.

    python benchmarks/eval_generation.py [RUN_DIR] [--slow-prompts 4]

RUN_DIR defaults to runs/quickstart-chat, the chat quickstart's run (`python -m lora_sft train
recipes/quickstart-chat.yaml` first). Prints a Markdown table and writes it to
benchmarks/results/eval-generation-<device>-<date>.md. The goal (issue 21): base + fine-tuned on 60 held-out prompts
within 2 minutes on 2 CPU cores, including making the fast model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default=str(REPO / "runs/quickstart-chat"))
    parser.add_argument("--slow-prompts", type=int, default=4, help="prompts generated through the 4-bit layers")
    args = parser.parse_args()

    import torch

    from lora_sft.export.evaluation import generate_text, generation_scores, generator, prompt_and_reference
    from lora_sft.export.reopen import open_run

    run = open_run(args.run_dir)
    e = run.recipe.eval
    items = list(run.bundle().eval)
    pairs = [p for ex in run.checked.eval if (p := prompt_and_reference(run.tokenizer, ex)) is not None][: e.generate]
    rows, total = [], 0.0
    for name in ("base", "fine_tuned"):
        began = time.perf_counter()
        trained = run.model() if name == "fine_tuned" else run.base()
        trained.eval()
        loaded = time.perf_counter() - began
        began = time.perf_counter()
        fast, how = generator(run, trained, items)
        made = time.perf_counter() - began
        began = time.perf_counter()
        scores, _ = generation_scores(run, fast, pairs)
        generated = time.perf_counter() - began
        del fast
        began = time.perf_counter()
        with torch.no_grad():
            for prompt, _, chat in pairs[: args.slow_prompts]:
                generate_text(trained, run.tokenizer, prompt, e.max_new_tokens, chat)
        slow = (time.perf_counter() - began) / max(1, min(args.slow_prompts, len(pairs)))
        total += made + generated
        rows.append(
            f"| {name.replace('_', '-')} | {how['model']} | {how.get('max_abs_logit_diff', 0):.2g} | {loaded:.1f} | {made:.1f} | "
            f"{generated:.1f} | {scores.get('exact_match', float('nan')):.3f} | {slow:.2f} ({slow * len(pairs):.0f} s for {len(pairs)}) |"
        )
        print(rows[-1], flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = [
        f"# Eval generation ({device}, {os.cpu_count()} cores, {datetime.date.today().isoformat()})",
        "",
        f"Run: `{Path(args.run_dir).name}` ({run.recipe.model.path}), {len(pairs)} held-out prompts, greedy, at most {e.max_new_tokens} new tokens.",
        "",
        "| model | generated with | max abs logit diff to the model as trained | load (s) | fast model made (s) | generated (s) | exact match | 4-bit layers, one prompt at a time (s per prompt) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Base + fine-tuned, fast model made and {len(pairs)} prompts each generated: {total:.0f} s (goal: 120 s).",
    ]
    text = "\n".join(table) + "\n"
    print(text)
    out = REPO / "benchmarks/results" / f"eval-generation-{device}-{datetime.date.today().isoformat()}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
