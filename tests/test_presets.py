"""Team-wide presets: ours, a shared folder, a pip package with a SearchPathPlugin, validation and trust."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters.config import compose
from adapters.errors import ConfigError
from adapters.presets import list_presets

from conftest import ENV, REPO, TRAIN, output, run, run_dirs, train

TEAM_PACKAGE = REPO / "examples" / "team-presets"
WIDER_TRUST = "trust.allowed_targets=[adapters.,torch.nn.,team_presets.models.]"


def write_preset(folder: Path, name: str, body: str) -> Path:
    (folder / "preset").mkdir(parents=True, exist_ok=True)
    path = folder / "preset" / f"{name}.yaml"
    path.write_text("# @package _global_\n" + textwrap.dedent(body))
    return path


def test_our_presets_set_framework_ddp_launcher_and_options():
    cfg, choices = compose(["preset=detection-cpu-smoke"], with_choices=True)
    assert (choices["framework"], choices["ddp"], choices["launcher"]) == ("mmdet", "auto", "local")
    assert cfg.framework.max_iters == 2 and cfg.launcher.nproc == 2
    cfg, choices = compose(["preset=nnunet-no-deep-supervision"], with_choices=True)
    assert choices["ddp"] == "ignore" and cfg.framework.deep_supervision is False


def test_command_line_wins_over_the_preset():
    cfg, choices = compose(["preset=torch-heads-off", "ddp=safe", "framework.steps=3"], with_choices=True)
    assert choices["ddp"] == "safe" and cfg.ddp.unused_params.name == "find" and cfg.framework.steps == 3


@pytest.mark.slow
def test_a_preset_trains(workdir):
    proc = train(workdir, "preset=torch-heads-off", "framework.steps=6", "framework.log_every=3")
    assert proc.returncode == 0, output(proc)
    assert (
        "DDP as built: find_unused_parameters=False, static_graph=True"
        in (run_dirs(workdir)[0] / "rank0.log").read_text()
    )


def test_a_shared_folder(tmp_path):
    write_preset(tmp_path, "ours", """
        defaults:
          - override /ddp: static
          - _self_
        framework:
          deep_supervision: false
    """)  # fmt: skip
    cfg, choices = compose([f"hydra.searchpath=[file://{tmp_path}]", "preset=ours"], with_choices=True)
    assert choices["ddp"] == "static" and cfg.framework.deep_supervision is False
    names = {(p.name, p.trusted) for p in list_presets([f"hydra.searchpath=[file://{tmp_path}]"])}
    assert ("ours", False) in names and ("torch-heads-off", True) in names


@pytest.mark.parametrize("body,words", [
    ("ddp:\n  unusd_params: find\n", ["ddp.unusd_params is not a known setting", "Did you mean ddp.unused_params?"]),
    ("ddp:\n  unused_params: findd\n", ["ddp.unused_params=findd is not a valid value", "strict, find, static"]),
    ("framework:\n  stepz: 3\n", ["framework.stepz is not a known setting", "Did you mean framework.steps?"]),
])  # fmt: skip
def test_a_bad_shared_preset_fails_at_compose_time_naming_the_file(tmp_path, body, words):
    path = write_preset(tmp_path, "broken", body)
    with pytest.raises(ConfigError) as error:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "preset=broken"])
    for w in words:
        assert w in str(error.value)
    assert f"(in preset=broken: file://{path}" in str(error.value)


def test_a_shared_preset_may_only_name_allowed_callables(tmp_path):
    write_preset(tmp_path, "evil", "framework:\n  model:\n    _target_: os.system\n")
    with pytest.raises(ConfigError, match=r"preset=evil \(from file://.*evil.yaml.*\) names the callable 'os.system'"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "preset=evil"])
    write_preset(tmp_path, "sneaky", "trust:\n  allowed_targets: [os.]\n")
    with pytest.raises(ConfigError, match="sets `trust`: a shared config cannot widen what it is trusted with"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "preset=sneaky"])


def test_refused_callable_through_train_py_writes_nothing(tmp_path, workdir):
    write_preset(tmp_path, "evil", "framework:\n  data:\n    _target_: subprocess.call\n")
    proc = train(workdir, f"hydra.searchpath=[file://{tmp_path}]", "preset=evil")
    assert proc.returncode == 2 and "names the callable 'subprocess.call'" in proc.stderr
    assert run_dirs(workdir) == []


@pytest.fixture(scope="module")
def team_site(tmp_path_factory):
    """The template team package, built and installed (into a folder put on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("team") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(TEAM_PACKAGE)], check=True, capture_output=True, text=True)  # fmt: skip
    return {"PYTHONPATH": f"{site}:{ENV['PYTHONPATH']}"}


def test_an_installed_package_s_presets_are_visible_with_no_flag(team_site, workdir):
    proc = run([sys.executable, "-m", "adapters", "presets"], workdir, env=team_site)
    assert proc.returncode == 0, output(proc)
    assert "preset=team-heads-off    pkg://team_presets.conf/preset/team-heads-off.yaml (team-presets)" in proc.stdout
    assert "preset=detection-cpu-smoke" in proc.stdout
    proc = run([sys.executable, "-m", "adapters", "explain", "preset=team-heads-off", "--json"], workdir, env=team_site)
    assert proc.returncode == 0, output(proc)
    assert '"preset": "team-heads-off"' in proc.stdout


@pytest.mark.slow
def test_a_package_preset_with_its_own_model_needs_trust_then_trains(team_site, workdir):
    proc = train(workdir, "preset=team-tiny-model", env=team_site)
    assert proc.returncode == 2 and "names the callable 'team_presets.models.TinySegNet'" in proc.stderr
    proc = train(workdir, "preset=team-tiny-model", WIDER_TRUST, env=team_site)
    assert proc.returncode == 0, output(proc)
    assert "step 6/6" in proc.stdout and "ddp=auto chose ignore" in proc.stdout


@pytest.mark.slow
def test_the_wheel_carries_conf_and_works_installed(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    [wheel] = wheels.glob("ddp_adapters-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # The packages this environment already has (torch above all, a gigabyte to unpack) are visible to the new
    # one through a .pth line instead of being installed again, and `pip check` verifies the wheel's declared
    # requirements against them. The package itself comes only from the wheel: this environment has it as an
    # editable install, whose finder a .pth line does not load.
    import torch

    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "test_env.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True)  # fmt: skip
    deps = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)  # the wheel's requirements met
    assert "ddp-adapters" not in deps.stdout, deps.stdout
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    explain = subprocess.run([py, "-m", "adapters", "explain", "framework=torch", "ddp=safe"], cwd=cwd, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert explain.returncode == 0, explain.stderr
    assert "find_unused_parameters=True" in explain.stdout
    where = subprocess.run([py, "-c", "import adapters.schemas as c; print(c.conf_dir())"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "site-packages/adapters/conf" in where, "conf/ comes from the wheel, not a clone"
    presets = subprocess.run([py, "-m", "adapters", "presets"], cwd=cwd, env=env, capture_output=True, text=True)
    assert "preset=torch-heads-off" in presets.stdout
    job = subprocess.run([str(venv / "bin" / "ddp-train"), "preset=torch-heads-off", "--cfg", "job"], cwd=cwd,
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert job.returncode == 0 and "unused_params: static" in job.stdout, job.stderr


def test_train_py_lists_presets_in_help():
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, env=ENV)
    assert "preset: detection-cpu-smoke, nnunet-no-deep-supervision, torch-heads-off" in proc.stdout


# --- what a shared source could try: each class refused before anything of it runs ---------------------


class Payload:
    """Unpickling it touches the marker file: what torch.load of a shared file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _shared(tmp_path: Path, files: dict[str, str]) -> Path:
    team = tmp_path / "team"
    for name, body in files.items():
        (team / name).parent.mkdir(parents=True, exist_ok=True)
        (team / name).write_text(textwrap.dedent(body))
    return team


BYPASSES = {
    "an aliased target (torch.load spelled under torch.nn.)": (
        {"preset/evil.yaml": """\
            # @package _global_
            framework:
              model: {_target_: torch.nn.modules.module.torch.load, f: PAYLOAD, weights_only: false}
            """}, ["preset=evil"],
        ["framework.model._target_='torch.nn.modules.module.torch.load' (set by preset/evil.yaml from file://",
         "is spelled under trust.allowed_targets", "really torch.serialization.load"]),
    "a target hidden in an interpolation": (
        {"preset/evil.yaml": """\
            # @package _global_
            framework:
              model: "${oc.decode:'{_target_: pathlib.Path.touch, self: MARKER}'}"
            """}, ["preset=evil"],
        ["framework.model._target_='pathlib.Path.touch' (set by preset/evil.yaml", "names a callable outside"]),
    "another group pulled in by a preset's defaults": (
        {"preset/evil.yaml": "# @package _global_\ndefaults:\n  - /extra: sneaky\n",
         "extra/sneaky.yaml": "# @package _global_\nframework:\n  data: {_target_: pathlib.Path.touch, self: M}\n"},
        ["preset=evil"], ["framework.data._target_='pathlib.Path.touch' (set by extra/sneaky.yaml", "outside"]),
    "a global file in an overridden group": (
        {"memory/x.yaml": "# @package _global_\nframework:\n  data: {_target_: pathlib.Path.touch, self: MARKER}\n"},
        ["memory=x"], ["framework.data._target_='pathlib.Path.touch' (set by memory/x.yaml", "outside"]),
    "a shared file shadowing this project's schema": (
        {"schema/framework/torch.yaml": "name: torch\nmodel: {_target_: pathlib.Path.touch, self: MARKER}\n"},
        [], ["schema/framework/torch.yaml from file://", "this project's own schema"]),
    "Hydra's logging configuration with a factory": (
        {"preset/evil.yaml": """\
            # @package _global_
            hydra:
              job_logging:
                version: 1
                handlers: {h: {"()": pathlib.Path.touch, self: MARKER}}
                root: {handlers: [h]}
            """}, ["preset=evil"], ["sets hydra.job_logging", "Fix: remove `hydra.job_logging`"]),
    "Hydra callbacks behind oc.decode": (
        {"preset/evil.yaml": """\
            # @package _global_
            hydra:
              callbacks: "${oc.decode:'{x: {_target_: pathlib.Path.touch, self: MARKER}}'}"
            """}, ["preset=evil"], ["sets hydra.callbacks"]),
    "an mmdet config that is a Python file": (
        {"preset/evil.yaml": "# @package _global_\ndefaults:\n  - override /framework: mmdet\n"
                             "framework:\n  config: SHARED/evil.py\n",
         "evil.py": "import pathlib; pathlib.Path('MARKER').touch()\n"},
        ["preset=evil"], ["sets framework.config=", "mmengine executes", "trust.allow_python_configs=true"]),
    "a checkpoint to resume from (loading unpickles it)": (
        {"preset/evil.yaml": "# @package _global_\nresume: SHARED/run\n", "run/checkpoints/last.pt": "PICKLE"},
        ["preset=evil"], ["sets resume=", "loading one unpickles it", "trust.allow_python_configs=true"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_a_shared_source_cannot_run_code(tmp_path, monkeypatch, capsys, name):
    import pickle
    import signal

    from adapters.cli import train_main

    files, args, words = BYPASSES[name]
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.pt"
    payload.write_bytes(pickle.dumps(Payload(marker)))
    team = tmp_path / "team"
    files = {k: v.replace("MARKER", str(marker)).replace("self: M}", f"self: {marker}}}")
             .replace("PAYLOAD", str(payload)).replace("SHARED", str(team))
             for k, v in files.items()}  # fmt: skip
    _shared(tmp_path, files)
    for name, body in files.items():
        if body == "PICKLE":  # a checkpoint whose loading runs the payload
            (team / name).write_bytes(payload.read_bytes())
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = train_main([f"hydra.searchpath=[file://{team}]", *args])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert code == 2, err
    for word in words:
        assert word in err, err
    assert "Fix:" in err and "Traceback" not in err
    assert not marker.exists(), "the payload ran"
    assert list(workdir.iterdir()) == [], "nothing written"


def test_a_python_config_from_a_shared_source_can_be_allowed_on_purpose(tmp_path):
    team = _shared(tmp_path, {"preset/mine.yaml": "# @package _global_\ndefaults:\n  - override /framework: mmdet\n"
                                                  "framework:\n  config: /somewhere/mine.py\n"})  # fmt: skip
    overrides = [f"hydra.searchpath=[file://{team}]", "preset=mine"]
    with pytest.raises(ConfigError, match="trust.allow_python_configs=true"):
        compose(overrides)
    assert compose([*overrides, "trust.allow_python_configs=true"]).framework.config == "/somewhere/mine.py"
