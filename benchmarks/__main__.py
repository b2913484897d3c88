import os

# Before anything imports huggingface_hub or wandb (they read these once, at import): no hub, offline W&B.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
    os.environ.setdefault(_key, _value)

from personalize.cli import quiet_libraries  # noqa: E402

quiet_libraries()  # before the harness imports the pipelines, which is when transformers speaks up

from benchmarks.run import main  # noqa: E402

main()
