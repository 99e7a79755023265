"""The policy and its presets, translated without starting any process."""

from __future__ import annotations

import json

import pytest

from adapters import registry
from adapters.cli import explain
from adapters.config import compose, validate
from adapters.errors import ConfigError
from adapters.native import buffer_sync_kwarg, ddp_kwargs, debug_env
from adapters.policy import Backend, DDPPolicy, DebugLevel, UnusedParams, check_kwargs, check_policy
from adapters.schemas import conf_dir

PRESETS = sorted(p.stem for p in (conf_dir() / "ddp").glob("*.yaml"))
# Every conf/ddp preset -> TORCH_DISTRIBUTED_DEBUG on gloo and on nccl. (DDP keyword arguments per preset:
# the table in adapter_contract.py, checked for every adapter.)
EXPECTED_ENV = {
    "strict": ({}, {}),
    "safe": ({}, {}),
    "static": ({}, {}),
    "debug": ({"TORCH_DISTRIBUTED_DEBUG": "INFO"}, {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}),
    "auto": ({}, {}),
    "ignore": ({}, {}),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_debug_environment(preset):
    policy = validate(compose([f"ddp={preset}"]), for_run=False).policy
    assert (debug_env(policy, Backend.gloo)[0], debug_env(policy, Backend.nccl)[0]) == EXPECTED_ENV[preset]


@pytest.mark.parametrize("framework", registry.FRAMEWORKS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_framework_and_preset_compose_and_translate(framework, preset):
    cfg, choices = compose([f"framework={framework}", f"ddp={preset}"], with_choices=True)
    assert choices["framework"] == framework and choices["ddp"] == preset
    checked = validate(cfg, for_run=False)
    native = registry.load_adapter(framework).translate(checked.policy, backend=Backend.gloo)
    json.dumps(dict(native.settings))  # plain data: printable, comparable, picklable
    assert native.framework == framework


def test_pass_through_settings_only_when_set():
    policy = DDPPolicy(broadcast_buffers=False, bucket_cap_mb=50, kwargs={"init_sync": True})
    # torch 2.13 renamed broadcast_buffers; the installed torch's name is used, so no FutureWarning is raised.
    assert ddp_kwargs(policy) == {buffer_sync_kwarg(): False, "bucket_cap_mb": 50, "init_sync": True}
    assert ddp_kwargs(DDPPolicy()) == {}


def test_command_line_overrides_reach_the_policy():
    cfg = compose(["ddp.unused_params=find", "ddp.debug=info", "ddp.broadcast_buffers=false",
                   "ddp.bucket_cap_mb=50", "launcher.nproc=4", "framework.steps=100"])  # fmt: skip
    checked = validate(cfg, for_run=False)
    assert checked.policy == DDPPolicy(
        unused_params=UnusedParams.find, debug=DebugLevel.info, broadcast_buffers=False, bucket_cap_mb=50.0
    )
    assert checked.launcher.nproc == 4 and cfg.framework.steps == 100


def test_debug_detail_is_lowered_on_gloo_with_a_reason():
    env, notes = debug_env(DDPPolicy(debug=DebugLevel.detail), Backend.gloo)
    assert env == {"TORCH_DISTRIBUTED_DEBUG": "INFO"} and "segfault" in notes[0]
    assert debug_env(DDPPolicy(debug=DebugLevel.detail), Backend.nccl) == ({"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, ())


def test_ignore_names_only_with_ignore():
    check_policy(DDPPolicy(unused_params=UnusedParams.ignore, ignore=["aux_head"]))
    with pytest.raises(ConfigError, match="ddp.ignore is set, but ddp.unused_params=find"):
        check_policy(DDPPolicy(unused_params=UnusedParams.find, ignore=["aux_head"]))
    with pytest.raises(ConfigError, match="ddp.probe_steps=0 is out of range: it must be at least 1"):
        check_policy(DDPPolicy(probe_steps=0))


def test_ddp_kwargs_checked_against_the_signature():
    check_kwargs(DDPPolicy(kwargs={"init_sync": False}))
    with pytest.raises(ConfigError, match="use ddp.unused_params=find"):
        check_kwargs(DDPPolicy(kwargs={"find_unused_parameters": True}))
    with pytest.raises(ConfigError, match="ddp.kwargs.device_ids cannot be passed through"):
        check_kwargs(DDPPolicy(kwargs={"device_ids": [0]}))
    with pytest.raises(ConfigError, match="Did you mean ddp.kwargs.init_sync"):
        check_kwargs(DDPPolicy(kwargs={"init_synk": False}))


def test_explain_prints_policy_and_native_settings():
    text = explain(["framework=torch", "ddp=safe"])
    assert "ddp preset: safe" in text
    assert "unused_params: find" in text
    assert "find_unused_parameters: true" in text
    assert "DistributedDataParallel(model, device_ids=None, find_unused_parameters=True)" in text
    data = json.loads(explain(["ddp=static", "ddp.bucket_cap_mb=50"], as_json=True))
    assert data["settings"] == {"ddp_kwargs": {"static_graph": True, "bucket_cap_mb": 50.0}}


def test_every_registered_framework_has_a_conf_file():
    for name in registry.FRAMEWORKS:
        assert (conf_dir() / "framework" / f"{name}.yaml").is_file(), name
