"""Device and precision resolution: bf16 only where the hardware runs it natively (the probes stand in for other
machines), explicit settings obeyed, emulated bf16 warned about, and the resolved values recorded by a run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from training.device import EmulatedBF16Warning, autocast, native_bf16, resolve_device, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_fp32_on_a_cpu_without_native_bf16() -> None:  # an AVX2-only CPU (AMD EPYC, older Intel)
    assert not native_bf16(CPU, cpu_probe=lambda: False)
    assert resolve_precision("auto", CPU, native=native_bf16(CPU, cpu_probe=lambda: False)) == "fp32"


def test_auto_picks_bf16_on_a_cpu_with_amx_or_avx512_bf16() -> None:
    assert resolve_precision("auto", CPU, native=native_bf16(CPU, cpu_probe=lambda: True)) == "bf16"


def test_auto_picks_bf16_on_a_cuda_device_that_has_it_and_fp32_on_one_that_does_not() -> None:
    assert resolve_precision("auto", CUDA, native=native_bf16(CUDA, cuda_probe=lambda: True)) == "bf16"  # Ampere+
    assert resolve_precision("auto", CUDA, native=native_bf16(CUDA, cuda_probe=lambda: False)) == "fp32"  # V100, T4


def test_explicit_settings_are_obeyed_and_emulated_bf16_warns_once_per_call() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32", CPU, native=True) == "fp32"
        assert resolve_precision("bf16", CPU, native=True) == "bf16"
    with pytest.warns(EmulatedBF16Warning, match="emulated"):
        assert resolve_precision("bf16", CPU, native=False) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32", CPU, native=False) == "fp32"  # no warning for what is not emulated


def test_device_auto_is_the_cpu_without_a_gpu_and_cuda_without_one_is_a_one_line_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_autocast_is_bf16_only_when_resolved_so() -> None:
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with autocast(CPU, "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (x @ w).dtype == torch.float32


def test_a_run_records_its_resolved_device_and_precision(tmp_path) -> None:
    """One process, the real training loop on real shards: the checkpoint's state names what auto resolved to."""
    from tests.shards import write_dataset, write_tokenizer
    from training.checkpoint import read_state
    from training.train import TrainConfig, train_loop

    dataset = write_dataset(tmp_path / "data", [16, 16])
    tokenizer = write_tokenizer(tmp_path / "tok")
    config = TrainConfig(data=str(dataset), preset="tiny", batch_size=8, steps=2, loader_workers=0,
                         checkpoint_every=2, precision="auto")
    states = []

    def report(metrics, directory):
        if directory is not None:
            states.append(read_state(directory))

    train_loop(config, tokenizer, report)
    runtime = states[-1]["runtime"]
    assert runtime["device"] == "cpu"
    assert runtime["precision"] == resolve_precision("auto", CPU)  # what this machine's CPU supports natively
    assert states[-1]["config"]["precision"] == "auto"
    # the hardware it names: no bf16 instruction set the kernel does not report (an AMD EPYC has AVX-512 BF16 alone;
    # torch may also leave out one the kernel lists but the process may not use)
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert "amx_tile" in flags or "AMX" not in runtime["hardware"], runtime["hardware"]
    assert "avx512_bf16" in flags or "AVX-512 BF16" not in runtime["hardware"], runtime["hardware"]
