"""A paper's table from a sweep: our numbers beside the paper's, per subject, per checkpoint step.

    personalize-report experiment=zeng2023_table1                  # best checkpoint per subject, as the paper
    personalize-report experiment=zeng2023_table1 report.selection=400   # one fixed step for every subject
    personalize-report experiment=jindal2023_table1 report.source=wandb  # runs from the W&B API instead

The experiment config says what to compare (`table:` methods, subjects, columns, steps, selection);
`report.yaml` composes the same groups as training, so `experiment=X` gives the report the sweep's W&B
group and table. Runs come from local run dirs (every `config.yaml` of that group under
`report.runs_dirs`) and/or from the W&B API; their results are the `metrics.jsonl` records the
evaluation writes, one per checkpoint x protocol.

Steps are compared as *stage steps* of each method's last stage (`stage_step` in the records): two_stage's
global steps 300..900 are its fine-tuning steps 200..800, the steps DreamBooth calls 200..800.

A table's `setup` (which setup its runs follow: the paper's text, the authors' code) is said under its
title and in the CSV; `paper_rows` puts a method beside a paper row of another name (Jindal's finetune row
beside the authors' DreamBooth). Every table with a CLIP-I or DINO column gets the "real images" row, the
subject's photos scored against each other (the evaluation's `real_images` record, eval.real_images=true),
beside the paper's where it has one; a paper row no method stands beside is listed as reference.

Nothing is averaged away silently: a subject without a value (no run, a failed run, a run not evaluated,
a step or protocol missing) makes its cell say "n/N" and is listed under "Missing" with the reason.

The parts, one job each: `spec` (what a table compares), `runs` (the runs and their records, from run
dirs or W&B), `tables` (checkpoint selection, means over subjects, what is missing), `render` (markdown,
CSV, plot), `page` (the self-contained HTML page), `command` (the `personalize-report` task). Nothing
here imports torch (tests/test_rundir.py checks it): a report needs no training stack.
"""
