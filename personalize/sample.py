"""Sample images from a checkpoint through the stock diffusers pipeline.

Image j of prompt i always uses seed + j, so every method and checkpoint sees the same noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.artifacts import load_checkpoint_pipeline
from personalize.io import atomic_save_image, atomic_write_text
from personalize.models import make_sampler
from personalize.rundir import CheckpointInfo, read_info


def format_prompt(template: str, info: CheckpointInfo) -> str:
    """Fill {phrase}/{identifier}/{class_noun} from a checkpoint's info (checkpoint.json)."""
    return template.format(**info.prompt_values())


@torch.no_grad()
def seeded_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
                  resolution: int | None = None, negative_prompt: str = "") -> list:
    """One PIL image per (prompt, seed), each drawn from its own CPU generator.

    So an image's noise depends only on its prompt and seed, never on the batch it was generated in.
    Its low bits still do (kernels pick other algorithms for other batch shapes): callers batch by
    absolute index, so a resumed job repeats the uninterrupted job's batches and matches it bit for bit.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    return pipe(
        list(prompts), negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
        height=resolution, width=resolution,
    ).images


def generate(pipe, prompts: list[str], num_images: int, seed: int = 0, steps: int = 25,
             guidance_scale: float = 7.5, batch_size: int = 4, resolution: int | None = None):
    """Yield (prompt_index, image_index, PIL image) for every prompt × image, batched across prompts."""
    jobs = [(p, j) for p in range(len(prompts)) for j in range(num_images)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        images = seeded_images(pipe, [prompts[p] for p, _ in chunk], [seed + j for _, j in chunk], steps,
                               guidance_scale, resolution)
        for (p, j), image in zip(chunk, images):
            yield p, j, image


def sample_checkpoint(ckpt_dir: Path, prompt_templates: list[str], out_dir: Path, num_images: int = 2,
                      seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, sampler: str = "dpm_multistep",
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write `out_dir/pNN_iNN.png` for each prompt × image and a prompts.txt; return the image paths."""
    info = read_info(ckpt_dir)
    pipe = make_sampler(load_checkpoint_pipeline(ckpt_dir, dtype=dtype, device=device), sampler)
    prompts = [format_prompt(t, info) for t in prompt_templates]
    paths = []
    for p, j, image in generate(pipe, prompts, num_images, seed, steps, guidance_scale):
        path = Path(out_dir) / f"p{p:02d}_i{j:02d}.png"
        atomic_save_image(image, path)
        paths.append(path)
    atomic_write_text(Path(out_dir) / "prompts.txt", "\n".join(prompts) + "\n")
    return paths
