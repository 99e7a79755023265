"""The core and framework=torch never import mmengine, mmdet, fastNLP or nnU-Net.

Tripwire packages with those names are put first on the path, so an accidental import would succeed
and be recorded (in an environment without the frameworks, a plain sys.modules check could never fail).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ENV, TRAIN

HEAVY = ("mmengine", "mmdet", "mmcv", "fastNLP", "nnunetv2")


@pytest.fixture
def tripwires(tmp_path):
    log = tmp_path / "imported.txt"
    log.write_text("")
    for name in HEAVY:
        (tmp_path / "wires" / name).mkdir(parents=True)
        (tmp_path / "wires" / name / "__init__.py").write_text(f"open({str(log)!r}, 'a').write('{name}\\n')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'wires'}:{ENV['PYTHONPATH']}"}
    return env, log


def _run(args, env, cwd):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


def test_the_tripwires_work(tripwires, tmp_path):
    env, log = tripwires
    _run([sys.executable, "-c", "import mmengine, fastNLP"], env, tmp_path)
    assert log.read_text().split() == ["mmengine", "fastNLP"]


def test_package_compose_and_explain_import_no_framework(tripwires, tmp_path):
    env, log = tripwires
    code = (
        "import adapters, adapters.cli, adapters.launch, adapters.worker; "
        "from adapters.config import compose, validate; "
        "validate(compose(['framework=torch', 'ddp=safe'])); "
        "print(adapters.cli.explain(['framework=torch', 'ddp=safe']))"
    )
    proc = _run([sys.executable, "-c", code], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run([sys.executable, "-m", "adapters", "explain", "framework=torch", "ddp=safe"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == ""


@pytest.mark.slow
def test_a_torch_training_run_imports_no_framework(tripwires, tmp_path):
    env, log = tripwires
    proc = _run([sys.executable, str(TRAIN), "framework.steps=2", "framework.log_every=1"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == ""
