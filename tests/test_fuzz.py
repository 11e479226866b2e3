"""The fuzzer in the suite (tests/fuzz_inputs.py): a fixed seed and a budget of random recipes, data rows, file
names, overrides and environment variables through `validate`, `preview` and a one-step `train` on the tiny Llama.
Property: exit 0 or 2, never 1; no traceback; exit 2 prints one `error: ...` line per problem and nothing else;
nothing written in the user's folder on exit 2, nor ever by validate or preview. Every case runs (no stop at the
first finding): the failure lists each broken case. `python benchmarks/fuzz.py -n 2000` runs it long."""

from __future__ import annotations

import pytest
from fuzz_inputs import cases, run_case
from hypothesis import HealthCheck, Phase, given, seed, settings

pytestmark = pytest.mark.unit
BUDGET = 150  # cases; about 40 s on 2 cores
SEED = 20261204


def test_no_input_ends_in_exit_1_a_traceback_or_a_changed_folder(tiny_llama, tmp_path):
    findings: list[str] = []
    commands: dict[str, set[int]] = {}

    @seed(SEED)
    @settings(
        max_examples=BUDGET,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(tiny_llama))
    def one(case):
        outcome = run_case(case, tmp_path / "case", tmp_path / "cache")
        commands.setdefault(case.command, set()).add(outcome.code)
        if outcome.problems:
            findings.append(
                f"{'; '.join(outcome.problems)}\nstderr: {outcome.stderr.strip()[-800:]}\ncase: {case.describe()}"
            )

    one()
    assert not findings, f"{len(findings)} of {BUDGET} cases broke the property:\n\n" + "\n\n".join(findings[:5])
    # the budget reached all three commands, and each both ran (0) and refused (2): the cases are not all refused
    assert {c: {0, 2} <= codes for c, codes in commands.items()} == {"validate": True, "preview": True, "train": True}
