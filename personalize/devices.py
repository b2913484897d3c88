"""Where a job runs and in which dtype: one home for every device and dtype choice.

- Training and evaluation of a run read the `hardware` preset (conf/hardware): a run parses it once into
  `HardwareSettings` (train.prepare_run), `resolve_hardware` turns its `auto`s into what this machine has,
  `device_of` names the torch device of its accelerator.
- The jobs that take a plain `device=` / `dtype=` (personalize-edit, personalize-sample) resolve them
  with `resolve_device` and `resolve_dtype`.
- `dtype_name` is the short name a run prints (fp32, bf16, fp16).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from personalize.errors import PersonalizeError

# The names a setting may give a dtype; the first three are those the `hardware.frozen_dtype` preset uses.
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class HardwareSettings:
    """`conf/hardware` as plain values: where and in which precision a run trains (what `resolve_hardware`
    decides), how many processes, and the switches that trade memory against speed.

    Here rather than with the method's settings: they are this module's device and dtype choices, and the
    rest (gradient checkpointing, channels_last, the 8-bit optimizer) is how those devices are used."""

    name: str
    accelerator: str  # auto | gpu | cpu
    precision: str  # Lightning's (32-true, bf16-mixed, 16-mixed, ...) or auto
    frozen_dtype: str  # of what never trains: float32 | bfloat16 | float16 | auto
    devices: int | str | tuple[int, ...]  # as Lightning takes them: a count, -1 / "auto", or device ids
    num_nodes: int
    strategy: str
    nan_check_every: int  # read the loss on the host (a device sync) every N steps; 0: never
    gradient_checkpointing: bool = False
    optimizer: str | None = None  # adamw8bit: the stages on adamw run 8-bit AdamW; None: the stages' own
    compile_unet: bool = False
    channels_last: bool = False
    offload_text_encoders: bool = False  # off the accelerator while a stage uses only cached prompt embeddings
    deterministic: bool = False  # deterministic CUDA kernels

    @classmethod
    def from_cfg(cls, hw_cfg: DictConfig | Mapping) -> "HardwareSettings":
        c = OmegaConf.to_container(hw_cfg, resolve=True) if isinstance(hw_cfg, DictConfig) else dict(hw_cfg)
        devices = c.get("devices", 1)
        return cls(
            name=str(c["name"]), accelerator=str(c["accelerator"]), precision=str(c["precision"]),
            frozen_dtype=str(c["frozen_dtype"]), devices=tuple(devices) if isinstance(devices, list) else devices,
            num_nodes=int(c.get("num_nodes", 1) or 1), strategy=str(c.get("strategy", "auto")),
            nan_check_every=int(c["nan_check_every"]), gradient_checkpointing=bool(c.get("gradient_checkpointing", False)),
            optimizer=None if c.get("optimizer") is None else str(c["optimizer"]),
            compile_unet=bool(c.get("compile_unet", False)), channels_last=bool(c.get("channels_last", False)),
            offload_text_encoders=bool(c.get("offload_text_encoders", False)),
            deterministic=bool(c.get("deterministic", False)),
        )

    @property
    def trainer_devices(self) -> int | str | list[int]:
        """`devices` as the Lightning Trainer takes it (device ids as a list)."""
        return list(self.devices) if isinstance(self.devices, tuple) else self.devices


def resolve_hardware(hw: HardwareSettings | DictConfig) -> tuple[str, str, torch.dtype]:
    """(accelerator, precision, dtype of frozen parts) with `auto` decided by what this machine has.

    Takes the settings or the preset's config (evaluation reruns and the class-image script pass that):
    it reads the same four fields of either."""
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
