"""Generate a sweep's DreamBooth class images once per class, before launching it in parallel.

    python experiments/prepare_class_images.py experiment=zeng2023_table1 [hydra overrides ...]

The sequential launcher needs no such step: the class-image cache (personalize/class_images.py) makes a
class's images in the first job that needs them and every later job reuses them. Jobs that run at the
same time (joblib, SLURM) would each find the cache empty and make the same images; running this
first (one process, one GPU) leaves them nothing to generate. It walks the experiment's table (methods
x subjects), composes each job's config exactly as the sweep will, and for every method with a
prior-preservation loss calls the training code's own `prepare_class_images`, so the cache key is the
one the jobs will look up. Subjects of a class already done are reused, not generated again.
"""

from __future__ import annotations

import logging
import sys

from personalize.config import compose
from personalize.data import Subject
from personalize.errors import PersonalizeError
from personalize.methods.stages import parse_stages
from personalize.devices import device_of, resolve_hardware
from personalize.train import prepare_class_images


def jobs(overrides: list[str]) -> list[tuple[str, str]]:
    """(method, subject) of every job of the experiment's table (or of the command line's choice)."""
    cfg = compose("train", overrides, output_dir="/unused")
    table = cfg.get("table")
    methods = list(table.methods) if table is not None else [cfg.method.name]
    subjects = list(table.subjects) if table is not None else [cfg.subject.name]
    return [(m, s) for m in methods for s in subjects]


def prepare(overrides: list[str]) -> int:
    """Make every class's images of the sweep; returns how many (method, subject) jobs needed them."""
    needed, done = 0, set()
    for method, subject in jobs(overrides):
        cfg = compose("train", [*overrides, f"method={method}", f"subject={subject}"], output_dir="/unused")
        stages = parse_stages(cfg.method.stages)
        if not any(stage.prior_loss_weight > 0 for stage in stages):
            continue
        needed += 1
        subj = Subject.from_cfg(cfg.subject)
        key = (method, subj.class_noun)
        if key in done:
            continue
        accelerator, _, dtype = resolve_hardware(cfg.hardware)
        prepare_class_images(cfg, subj, stages, device_of(accelerator), dtype)
        done.add(key)
    return needed


def main(argv: list[str]) -> int:
    from personalize.cli import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        needed = prepare(argv)
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"class images ready for {needed} job(s) with a prior-preservation loss")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
