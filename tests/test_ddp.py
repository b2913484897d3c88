"""Multi-process training: Lightning DDP over two CPU processes (gloo) gives what one process gives with the
same global batch, within float tolerance; only rank 0 writes checkpoints, samples and W&B."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from personalize.config import PROJECT_ROOT
from personalize.train import fit, prepare_run

# two_stage: the hard case for DDP, each stage trains (and freezes) a different part of the model
RUN = ["eval=none", "subject=sample_dog", "method=two_stage", "method.stages.token.steps=2", "method.stages.token.lr=5e-2",
       "method.stages.unet.steps=2", "method.stages.unet.checkpoint_every=1", "method.stages.unet.lr=1e-3"]
SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN0123456789"}


def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path, make_cfg):
    import os

    log_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "debug=default", *RUN, "hardware=ddp_cpu", "method.batch_size=1",
         "logger=wandb_offline", f"paths.log_dir={log_dir}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, **SECRETS),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # really two processes
    [run_dir] = [p.parent for p in log_dir.glob("train/runs/*/config.yaml")]

    single = fit(prepare_run(make_cfg(*RUN, "method.batch_size=2", name="single")))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [c.name for c in single.checkpoints()] == ["step-000003", "step-000004"]
    for name in checkpoints:
        for file in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors"):
            ddp, one = load_file(run_dir / "checkpoints" / name / file), load_file(single.run_dir / "checkpoints" / name / file)
            for key in one:
                # Adam's first steps move each weight by about lr (1e-3): a rank that missed the other's
                # gradients would be off by that much, float reordering by far less
                assert torch.allclose(ddp[key], one[key], rtol=0, atol=2e-4), (name, file, key)

    # rank 0 alone wrote: each checkpoint once, one W&B run, one set of samples
    for name in checkpoints:
        assert output.count(f"saved checkpoint {run_dir / 'checkpoints' / name}\n") == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run_dir / "samples").iterdir())) == 1

    # no API key or token in anything the run wrote (configs, logs, W&B files) or printed
    for path in [p for p in log_dir.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in SECRETS.values()), path
    assert not any(secret in output for secret in SECRETS.values())
