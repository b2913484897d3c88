"""Evaluation of a run dir's checkpoints: `evaluate` (which checkpoint x protocol pairs, in what order),
`settings` (conf/eval as values, the checks before anything runs), `evaluator` (what is loaded once; one
pair from generation to its metrics record), `images` (photos, image folders, grids), `publish` (W&B and
the printed table), `rerun` (`personalize-eval` on an existing run), `protocols` (the prompt lists),
`metrics` (CLIP-I/T, DINO, CLIP score, FID, IS), `real_images` (the subject's photos scored against each
other: a table's ceiling), `standins` (tiny local evaluation models).

Submodules are imported on demand: `protocols` and `settings` are cheap, `metrics` pulls torchmetrics and
transformers.
"""
