"""The benchmark: every method's training step against the floor and the naive path, generation,
end to end, evaluation and memory, as ratios measured in one run.

    python -m benchmarks            # the bench-sized SD model on this machine (make bench)
    python -m benchmarks --quick    # smoke run on the tiny model (the test)
    python -m benchmarks --sd21 --device cuda

See docs/benchmark.md. Modules: `models` (random-weight SD shapes), `training` (items 1, 2, 6),
`sampling` (3, 5), `report` (4 and the table), `run` (the command line).
"""
