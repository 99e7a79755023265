"""From a user's own script: one call turns a team preset into each framework's native settings (adapters.api)."""

from __future__ import annotations

import sys

import pytest

from adapters.api import Policy
from adapters.errors import ConfigError

from conftest import REPO, output, run

TEAM_PRESET = """\
# @package _global_
# A team's preset: framework-neutral, the same file for every trainer the team uses.
defaults:
  - override /ddp: auto
  - _self_
ddp:
  probe_steps: 3
  bucket_cap_mb: 50
"""


@pytest.fixture
def team(workdir):
    (workdir / "team" / "preset").mkdir(parents=True)
    (workdir / "team" / "preset" / "team-seg.yaml").write_text(TEAM_PRESET)
    return workdir / "team"


def test_a_team_preset_becomes_each_framework_s_own_settings(team):
    overrides = ["preset=team-seg", f"hydra.searchpath=[file://{team}]"]
    assert Policy(overrides).ddp_kwargs() == {"bucket_cap_mb": 50}
    assert Policy(overrides, framework="fastnlp").fastnlp_trainer_kwargs() == {
        "torch_kwargs": {"ddp_kwargs": {"bucket_cap_mb": 50}}
    }
    assert Policy(["ddp=static"], framework="mmdet").native.settings["model_wrapper_cfg"]["static_graph"] is True
    with pytest.raises(ConfigError, match="this Policy is for framework=torch; create it with framework='mmdet'"):
        Policy(overrides).apply_to_mmengine({})


def test_a_shared_preset_cannot_run_code_through_the_library_either(team):
    (team / "preset" / "evil.yaml").write_text(
        "# @package _global_\nframework:\n  model:\n    _target_: os.system\n    command: touch /tmp/never\n"
    )
    with pytest.raises(ConfigError, match="names the callable .os.system. at framework.model._target_"):
        Policy(["preset=evil", f"hydra.searchpath=[file://{team}]"])


@pytest.mark.slow
def test_a_users_own_torch_loop_takes_the_policy_and_the_probe_from_a_team_preset(workdir, team):
    out = workdir / "out"
    out.mkdir()
    script = REPO / "tests" / "scripts" / "torch_own_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(team), str(out)]  # fmt: skip
    proc = run(cmd, workdir)  # and run() compares the digests every rank wrote
    assert proc.returncode == 0, output(proc)
    said = proc.stdout + proc.stderr
    assert "ddp=auto chose ignore: the same 4 parameters got no gradient in every step on every rank (probe: 3" in said
    assert "own script done: kwargs={'bucket_cap_mb': 50.0}, ignored=4" in proc.stdout
    assert "DDP as built: find_unused_parameters=False, static_graph=False" in said and "bucket_cap_mb=50.0" in said
    assert "replicas equal at the end of the run" in said
    assert sorted(p.name for p in out.glob("replica_rank*.json")) == ["replica_rank0.json", "replica_rank1.json"]
