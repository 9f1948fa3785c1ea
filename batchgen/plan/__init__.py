"""Config -> validated job table. Pure: no torch, no file reads beyond what ModelSpecs already hold (and the
prompts file the runner reads first).

values: config values checked; prompts: slots, <lora:...> tags, trigger words; stacks: LoRA states and the render
order; checks: names against the models' assets, the grid; jobs: the table and job_ids.
"""

from batchgen.plan.jobs import Plan, build_plan, select_models
from batchgen.plan.prompts import split_lora_tags, used_assets
from batchgen.plan.prompts_file import PromptRow, read_prompts_file

__all__ = [
    "Plan",
    "PromptRow",
    "build_plan",
    "read_prompts_file",
    "select_models",
    "split_lora_tags",
    "used_assets",
]
