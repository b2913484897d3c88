"""Where a job runs and in which dtype: one home for every device and dtype choice.

- Training and evaluation of a run read the `hardware` preset (conf/hardware): `resolve_hardware` turns
  its `auto`s into what this machine has, `device_of` names the torch device of its accelerator.
- The jobs that take a plain `device=` / `dtype=` (personalize-edit, personalize-sample) resolve them
  with `resolve_device` and `resolve_dtype`.
- `dtype_name` is the short name a run prints (fp32, bf16, fp16).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from personalize.errors import PersonalizeError

# The names a setting may give a dtype; the first three are those the `hardware.frozen_dtype` preset uses.
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_hardware(hw: DictConfig) -> tuple[str, str, torch.dtype]:
    """(accelerator, precision, dtype of frozen parts) with `auto` decided by what this machine has."""
    cuda = torch.cuda.is_available()
    accelerator = hw.accelerator if hw.accelerator != "auto" else ("gpu" if cuda else "cpu")
    if accelerator == "gpu" and not cuda:
        raise PersonalizeError(f"hardware={hw.name} needs a CUDA GPU but none is visible: use hardware=cpu (or auto)")
    precision = str(hw.precision)
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if accelerator == "gpu" else "32-true"
    frozen = str(hw.frozen_dtype)
    if frozen == "auto":
        frozen = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision, "float32")
    uses_fp16 = precision in ("16-mixed", "16-true") or frozen == "float16"
    if accelerator == "cpu" and uses_fp16:
        # CPU autocast runs layer norms in fp32, which then meet fp16 weights: fp16 is a GPU setting
        raise PersonalizeError(
            f"hardware.precision={precision} with frozen_dtype={frozen} does not run on CPU: "
            "use hardware.precision=bf16-mixed hardware.frozen_dtype=bfloat16 (or 32-true/float32)"
        )
    return accelerator, precision, DTYPES[frozen]


def device_of(accelerator: str) -> torch.device:
    """The torch device of a Lightning accelerator name (`gpu` or `cpu`, as `resolve_hardware` returns)."""
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


def resolve_device(device: str | None) -> str:
    """A `device=` setting: `auto` (or unset) is cuda when a GPU is visible, else cpu; cuda needs a GPU."""
    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PersonalizeError(f"device={device} but no CUDA GPU is available: use device=cpu (or auto)")
    return device


def resolve_dtype(dtype: str | None) -> torch.dtype:
    """A `dtype=` setting (float32, float16, bfloat16 or fp32/fp16/bf16; unset is float32)."""
    key = str(dtype or "float32")
    if key not in DTYPES:
        raise PersonalizeError(f"dtype={key} is not one of float32, float16, bfloat16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16 (what a run prints); any other dtype as torch names it."""
    return _SHORT_NAMES.get(dtype, str(dtype))
