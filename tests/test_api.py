"""From a user's own script: one call turns a team preset into each framework's native settings (adapters.api)."""

from __future__ import annotations

import re
import sys

import pytest

from adapters.api import Policy
from adapters.errors import ConfigError

from conftest import REPO, TEAM_PRESET, output, run


@pytest.fixture
def team(workdir):
    """A copy of the team's preset folder (tests/team), for tests that add a file of their own to it."""
    import shutil

    return shutil.copytree(REPO / "tests" / "team", workdir / "team")


def test_a_team_preset_becomes_each_framework_s_own_settings(team):
    overrides = ["preset=team-all", f"hydra.searchpath=[file://{team}]"]
    assert Policy(overrides).ddp_kwargs() == {"bucket_cap_mb": 50}
    assert Policy(overrides, framework="fastnlp").fastnlp_trainer_kwargs() == {
        "torch_kwargs": {"ddp_kwargs": {"bucket_cap_mb": 50}}
    }
    assert Policy(["ddp=static"], framework="mmdet").native.settings["model_wrapper_cfg"]["static_graph"] is True
    with pytest.raises(ConfigError, match="this Policy is for framework=torch; create it with framework='mmdet'"):
        Policy(overrides).apply_to_mmengine({})


WHERE_DDP_KWARGS_GO = {  # where the preset's bucket_cap_mb lands in each framework's own settings
    "torch": ("ddp_kwargs", "bucket_cap_mb"),
    "mmdet": ("model_wrapper_cfg", "bucket_cap_mb"),
    "fastnlp": ("outside_ddp_kwargs", "bucket_cap_mb"),
    "nnunet": ("ddp_kwargs", "bucket_cap_mb"),
    "lightning": ("strategy", "init_args", "bucket_cap_mb"),
    "accelerate": ("kwargs_handlers", "DistributedDataParallelKwargs", "bucket_cap_mb"),
    "transformers": ("TrainingArguments", "ddp_bucket_cap_mb"),
}


@pytest.mark.parametrize("framework", sorted(WHERE_DDP_KWARGS_GO))
def test_one_team_preset_drives_every_framework(framework):
    import json

    from adapters import registry
    from adapters.cli import explain

    assert sorted(WHERE_DDP_KWARGS_GO) == sorted(registry.FRAMEWORKS), "every framework is in this test"
    shown = json.loads(explain([f"framework={framework}", *TEAM_PRESET], as_json=True))
    assert shown["policy"]["unused_params"] == "auto" and shown["policy"]["probe_steps"] == 3
    value = shown["settings"]
    for key in WHERE_DDP_KWARGS_GO[framework]:
        value = value[key]
    assert value == 50, shown["settings"]


def test_a_shared_preset_cannot_run_code_through_the_library_either(team):
    (team / "preset" / "evil.yaml").write_text(
        "# @package _global_\nframework:\n  model:\n    _target_: os.system\n    command: touch /tmp/never\n"
    )
    with pytest.raises(ConfigError, match="names the callable .os.system. at framework.model._target_"):
        Policy(["preset=evil", f"hydra.searchpath=[file://{team}]"])


@pytest.mark.slow
def test_a_users_own_torch_loop_takes_the_policy_from_a_team_preset_and_decides_from_its_first_steps(workdir):
    out = workdir / "out"
    out.mkdir()
    script = REPO / "tests" / "scripts" / "torch_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "tests" / "team"), str(out)]  # fmt: skip
    proc = run(cmd, workdir)  # and run() compares the digests every rank wrote
    assert proc.returncode == 0, output(proc)
    said = proc.stdout + proc.stderr
    assert "ddp=auto chose ignore: the same 4 parameters got no gradient in every observed step on every rank " \
           "(observed: the first 3 training step(s)" in said  # fmt: skip
    assert "own script done: kwargs={'bucket_cap_mb': 50.0}, ignored=4" in proc.stdout
    assert "DDP as built: find_unused_parameters=False, static_graph=False" in said and "bucket_cap_mb=50.0" in said
    assert "replicas equal at the end of the run" in said
    assert sorted(p.name for p in out.glob("replica_rank*.json")) == ["replica_rank0.json", "replica_rank1.json"]


@pytest.mark.slow
def test_strict_in_a_users_own_loop_stops_at_step_1_with_the_names_and_the_fixes(workdir):
    out = workdir / "out"
    out.mkdir()
    script = REPO / "tests" / "scripts" / "torch_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "tests" / "team"), str(out), "ddp=strict"]  # fmt: skip
    proc = run(cmd, workdir)
    assert proc.returncode != 0, output(proc)
    said = re.sub(r"\[rank\d\]: ", "", output(proc))  # torchrun prefixes a failed rank's lines
    assert "own script step 1" not in said, "stopped inside step 1's backward, before its optimizer step"
    assert "Parameters that got no gradient on rank 0, by module:\n  heads.0: heads.0.weight, heads.0.bias" in said
    assert "Fix it on the command line:\n  ddp=auto" in said and "Parameter indices which did not receive grad" in said
