"""Reference jobs in the plan: every LoRA job names its no-LoRA twin, and sweep.references adds the twins a sweep
lacks (trigger words and inline tags change the prompt text as encoded, so the `none` stack does not hold those)."""

from __future__ import annotations

from pathlib import Path

from batchgen.config import compose_config
from batchgen.runner import prepare
from batchgen.spec import REFERENCE_STACK

ONE_SD1 = ("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.seeds=[1]", "~sweep.stacks.lycoris")
SAME_JOB = ["model", "prompt", "negative_prompt", "embeddings", "seed", "steps", "guidance_scale", "width", "height"]


def _plan(*overrides: str):
    return prepare(compose_config([*ONE_SD1, *overrides]))


def test_each_lora_job_points_at_its_no_lora_twin_and_the_none_stack_already_holds_them(tiny_cache: Path) -> None:
    plan = _plan()
    table = plan.table
    lora_rows = table[table["loras"] != ""]
    assert len(lora_rows) == 3 * 4 and (table["reference"][table["loras"] == ""] == "").all()
    assert plan.references_added == 0  # the none stack renders every twin
    by_id = table.set_index("job_id")
    for _, row in lora_rows.iterrows():
        twin = by_id.loc[row["reference"]]
        assert twin["loras"] == "" and twin["stack"] == "none"
        assert [twin[c] for c in SAME_JOB] == [row[c] for c in SAME_JOB]
    assert len(plan.jobs) == len(table)


def test_references_are_added_for_trigger_words_and_a_sweep_without_a_none_stack(tiny_cache: Path) -> None:
    before = {j.job_id for j in _plan("+sweep.lora_triggers={ink: 'ink drawing'}", "sweep.references=false").jobs}
    plan = _plan("+sweep.lora_triggers={ink: 'ink drawing'}")
    table = plan.table
    added = table[table["stack"] == REFERENCE_STACK]
    # ink's 2 weights and ink_grain put "ink drawing, " before 2 of the 3 prompts (the third has the words
    # already): 2 new texts, one twin each
    assert plan.references_added == len(added) == 2
    assert all(text.startswith("ink drawing, ") for text in added["prompt"])
    assert (added["loras"] == "").all() and (added["reference"] == "").all()
    assert set(table.loc[table["loras"] != "", "reference"]) <= set(table["job_id"])
    # Adding references never changes another job's id; they only add jobs.
    assert before < {j.job_id for j in plan.jobs} and len(plan.jobs) == len(before) + 2

    without_none = _plan("~sweep.stacks.none")
    assert without_none.references_added == 3  # the 3 prompts' twins
    assert _plan("~sweep.stacks.none", "sweep.references=false").references_added == 0


def test_dry_run_counts_the_added_references(run_cli) -> None:
    code, out, _ = run_cli(*ONE_SD1, "~sweep.stacks.none", "--dry-run")
    assert code == 0
    assert "  references: 3 of these jobs are no-LoRA references no stack renders" in out
    assert "jobs: 15 to render in total, 15 new" in out  # 12 LoRA jobs + 3 references
    code, out, _ = run_cli(*ONE_SD1, "~sweep.stacks.none", "sweep.references=false", "--dry-run")
    assert code == 0 and "references:" not in out and "jobs: 12 to render in total" in out
