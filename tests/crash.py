"""Run the `personalize` CLI and SIGKILL it at a chosen point, as a crash or a preempted job would.

    python -m tests.crash resume-save:4 method=... ...   # killed while writing the resume state of step 4
    python -m tests.crash class-image:2 method=... ...   # killed while writing class image #2
    python -m tests.crash eval-record:3 method=... ...   # killed while writing the 4th evaluation record

The kill lands in the middle of a write (half the bytes on disk under the temporary name), the worst
moment for a later run that trusts what it finds. Used by tests/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_resume_save(step: int) -> None:
    import personalize.resume as resume  # its SafetensorsCheckpointIO writes through resume.save_file

    save_checkpoint, save_file = resume.SafetensorsCheckpointIO.save_checkpoint, resume.save_file

    def half_then_die(tensors, filename, metadata=None):
        save_file(dict(list(tensors.items())[: len(tensors) // 2]), filename)
        die()

    def save(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == step:
            resume.save_file = half_then_die
        return save_checkpoint(self, checkpoint, path, storage_options)

    resume.SafetensorsCheckpointIO.save_checkpoint = save


def kill_in_class_image(index: int) -> None:
    import io

    import personalize.class_images as class_images

    save = class_images.atomic_save_image
    saved = []

    def save_or_die(image, path):
        if len(saved) == index:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")  # io.py's temporary name
            tmp.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        save(image, path)
        saved.append(path)

    class_images.atomic_save_image = save_or_die


def kill_in_eval_record(index: int) -> None:
    import personalize.eval.evaluator as evaluator
    from personalize.rundir import metrics_path

    append = evaluator.append_record
    written = []

    def append_or_die(run_dir, record):
        if len(written) == index:
            path = metrics_path(run_dir)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(path.read_text() + '{"step": ')  # the new file, cut short
            die()
        append(run_dir, record)
        written.append(record)

    evaluator.append_record = append_or_die


if __name__ == "__main__":
    point, at = sys.argv[1].split(":")
    kills = {"resume-save": kill_in_resume_save, "class-image": kill_in_class_image, "eval-record": kill_in_eval_record}
    kills[point](int(at))
    sys.argv = ["personalize", *sys.argv[2:]]
    from personalize.cli import train_main

    train_main()
