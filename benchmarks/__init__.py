"""The benchmark: every method's training step against the floor and the naive path, generation,
end to end, evaluation and memory, as ratios measured in one run.

    python -m benchmarks            # the bench-sized SD model on this machine (make bench)
    python -m benchmarks --quick    # smoke run on the tiny model (the test)
    python -m benchmarks --sd21 --device cuda

It lives beside the package, not in it (it is not installed; run it from the repository root). It
uses only the package's public API: `prepare_run` and `fit` (with its `callbacks_before/after`) for
training, pre-filled class-image caches, and the spans of `personalize.instrument` to time the phases
of an evaluation; nothing in `personalize` is patched.

See docs/benchmark.md. Modules: `catalog` (the methods and stages of conf/method/), `models`
(random-weight SD shapes), `training` (items 1, 2, 6), `sampling` (3, 5), `report` (4 and the table),
`run` (the command line).
"""
