"""The Celery app is built when first needed, never as a side effect of an import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CREDITWORKER_")}
    environment["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("module", ["creditworker.worker.app", "creditworker.http.auth"])
def test_importing_the_app_module_creates_no_folder(tmp_path: Path, module: str) -> None:
    """With the embedded defaults, building the app makes `.creditworker/broker/...`; an
    import (the gateway's auth imports the app module to learn the broker kind) must not."""
    done = _run(f"import {module}", tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_celery_finds_the_app_through_the_package(tmp_path: Path) -> None:
    """`celery -A creditworker` asks the package for `app`: it is built then, and only then."""
    done = _run(
        "from celery.app.utils import find_app\n"
        "found = find_app('creditworker')\n"
        "found.loader.import_default_modules()  # what a starting worker does\n"
        "print(type(found).__name__, found.main, 'creditworker.credits.add' in found.tasks)",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Celery", "creditworker", "True"]
    assert (tmp_path / ".creditworker" / "broker" / "queue").is_dir()
