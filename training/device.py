"""Where a model runs and in which precision: `device: auto` and `precision: auto`, resolved in the process that runs it.

bf16 autocast pays only where the hardware executes bf16 natively: a CUDA GPU with bf16 (Ampere and later), or a CPU
with AMX or AVX-512 BF16 (oneDNN's native bf16 paths). Anywhere else it is emulated, and slower than fp32 (an AVX2-only
CPU ran the `small` training step at 1.1 samples/s in bf16 against 33.2 in fp32), so `auto` picks fp32 there. An
explicit `bf16` or `fp32` is obeyed; forcing bf16 where it is emulated warns once.

Every job that runs a model (train, evaluate, embed, brand, search) resolves its settings here, prints
`describe(...)` when it starts and records the resolved values with its outputs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from collections.abc import Callable
from functools import cache
from typing import Literal

import torch

from pipeline.config import DeviceSetting, PrecisionSetting  # noqa: F401 - re-exported
from pipeline.errors import UserError

Precision = Literal["bf16", "fp32"]


class EmulatedBF16Warning(UserWarning):
    """bf16 was forced on hardware that only emulates it."""


@cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native bf16 instruction sets of this CPU as torch's cpuinfo sees them: AMX tiles, AVX-512 BF16 (an AMD EPYC
    can have the second without the first), or none."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX-512 BF16": "_is_avx512_bf16_supported"}
    probes = {name: getattr(torch.cpu, attr) for name, attr in probes.items() if hasattr(torch.cpu, attr)}
    if not probes:  # an older torch without the probes: oneDNN's own bf16 check (true on any AVX-512 core)
        return ("oneDNN bf16",) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()
    return tuple(name for name, probe in probes.items() if probe())


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matmuls natively: AMX tiles or AVX-512 BF16."""
    return bool(cpu_bf16_features())


def native_bf16(device: torch.device, cpu_probe: Callable[[], bool] = cpu_has_native_bf16,
                cuda_probe: Callable[[], bool] | None = None) -> bool:
    """Whether `device` runs bf16 natively (the probes are arguments so that tests can stand in for other hardware)."""
    if device.type == "cuda":
        return bool((cuda_probe or (lambda: torch.cuda.is_bf16_supported(including_emulation=False)))())
    if device.type == "cpu":
        return bool(cpu_probe())
    return False


def resolve_device(setting: str = "auto") -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu. `cuda` without a GPU is a one-line error, not a crash later."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {setting!r} was asked for but this process sees no CUDA GPU; use device auto or cpu")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device, native: bool | None = None) -> Precision:
    """`auto` -> bf16 where `device` runs it natively, else fp32; `bf16`/`fp32` are obeyed (emulated bf16 warns)."""
    native = native_bf16(device) if native is None else native
    if setting == "auto":
        return "bf16" if native else "fp32"
    if setting == "bf16" and not native:
        warnings.warn(f"precision bf16 was forced on {hardware_name(device)}, which has no native bf16: it is emulated "
                      f"there and can be many times slower than fp32 (use precision auto)", EmulatedBF16Warning,
                      stacklevel=2)
    if setting not in ("bf16", "fp32"):
        raise UserError(f"unknown precision {setting!r}; choose auto, bf16 or fp32")
    return setting  # type: ignore[return-value]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for the towers when `precision` is bf16; a no-op for fp32. Losses are computed in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} CPUs, {', '.join(cpu_bf16_features()) or 'no native bf16'})"


def describe(device: torch.device, precision: Precision) -> str:
    """One line for logs and metadata, e.g. `device cpu: Intel Xeon (2 CPUs, AMX, AVX-512 BF16), precision bf16`."""
    return f"device {device.type}: {hardware_name(device)}, precision {precision}"


def announce(job: str, device_setting: str = "auto", precision_setting: str = "auto") -> tuple[torch.device, Precision]:
    """Resolve both settings for a job that runs a model in this process, and print them on one line."""
    device = resolve_device(device_setting)
    precision = resolve_precision(precision_setting, device)
    print(f"{job}: {describe(device, precision)}", file=sys.stderr, flush=True)
    return device, precision
