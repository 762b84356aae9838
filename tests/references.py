"""The reference libraries for the import/export and tokenizer tests: open_clip and transformers (the `dev` extra).

open_clip imports torchvision, whose registry wheel links CUDA builds of torch's libraries, so its C++ ops fail to
register beside the CPU torch (`operator torchvision::nms does not exist`). Registering fake kernels is the only
thing that fails, and open_clip needs none of those ops: skip the registration while torchvision imports
(shared/PITFALLS.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest
import torch


def import_open_clip() -> ModuleType:
    """open_clip, imported beside the CPU torch; the test is skipped where it is not installed."""
    if importlib.util.find_spec("open_clip") is None:  # not importorskip: importing it first is what fails
        pytest.skip("open_clip_torch is a test dependency (pip install -e '.[dev]')")
    real = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = real
    return importlib.import_module("open_clip")


def import_transformers() -> ModuleType:
    return pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[dev]')")
