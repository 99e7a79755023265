"""Bad input: refused before any process starts and before any folder is written, with exit code 2, the key,
the valid choices or range, and the fix, and never a traceback.

The table goes through ``train_main``, the function ``train.py`` calls with its command line, in this process
(a fresh interpreter per case would add minutes); a sample of it also goes through a real ``train.py``.
"""

from __future__ import annotations

import signal
import textwrap

import pytest

from adapters.cli import train_main

from conftest import output, run_dirs, train

BROKEN_YAML = "# @package _global_\nddp:\n  unused_params: [find\n"

# (command line, words the message must contain: the key first, then the range or choices, and the fix)
CASES = [
    # framework
    (
        ["framework=keras"],
        ["framework=keras", "Available: accelerate, fastnlp, lightning, mmdet, nnunet, torch, transformers", "Fix:"],
    ),
    (["framework.steps=many"], ["framework.steps=many", "takes a whole number", "Fix: framework.steps="]),
    (["framework.steps=0"], ["framework.steps=0", "at least 1", "Fix: framework.steps=1"]),
    (["framework.batch_size=0"], ["framework.batch_size=0", "at least 1", "Fix:"]),
    (["framework.lr=-1"], ["framework.lr=-1", "above 0", "Fix: framework.lr=0.05"]),
    (["framework.lr=0"], ["framework.lr=0", "above 0", "Fix:"]),
    (["framework.lr=fast"], ["framework.lr=fast", "takes a number", "Fix:"]),
    (["framework.num_workers=-1"], ["framework.num_workers=-1", "0 (load in the training process) or more", "Fix:"]),
    (["framework.checkpoint_every=-1"], ["framework.checkpoint_every=-1", "0 (never) or more", "Fix:"]),
    (["framework.log_every=0"], ["framework.log_every=0", "at least 1", "Fix:"]),
    (["framework.deep_supervision=maybe"], ["framework.deep_supervision=maybe", "true or false", "Fix:"]),
    (["framework.model._target_=no_such_pkg.Net"], ["framework.model._target_=no_such_pkg.Net cannot be imported"]),
    (["framework.stepz=4"], ["framework.stepz is not a known setting", "Did you mean framework.steps?", "Fix:"]),
    (["+framework.nosuch=1"], ["framework.nosuch is not a known setting", "Valid keys in framework", "Fix:"]),
    # ddp
    (["ddp=fast"], ["ddp=fast", "Available: auto, debug, ignore, safe, static, strict", "Fix:"]),
    (["ddp.unused_params=findd"], ["ddp.unused_params=findd is not a valid value", "strict, find, static", "Fix:"]),
    (["ddp.unusd_params=find"], ["ddp.unusd_params is not a known setting", "Did you mean ddp.unused_params?"]),
    (["+ddp.unusd_params=find"], ["ddp.unusd_params is not a known setting", "Did you mean ddp.unused_params?"]),
    (["ddp.ignore=[aux]"], ["ddp.ignore is set, but ddp.unused_params=auto", "Fix: ddp=ignore"]),
    (["ddp.debug=loud"], ["ddp.debug=loud is not a valid value", "off, info, detail", "Fix:"]),
    (["+ddp.kwargs.static_graph=true"], ["ddp.kwargs.static_graph cannot be passed through", "ddp.unused_params="]),
    (["+ddp.kwargs.forward_sync_buffers=false"], ["ddp.kwargs.forward_sync_buffers cannot be passed", "ddp.broad"]),
    (["+ddp.kwargs.no_such_arg=1"], ["ddp.kwargs.no_such_arg is not a DistributedDataParallel argument"]),
    (["ddp.on_ignored_grad=maybe"], ["ddp.on_ignored_grad=maybe is not a valid value", "sync, fail", "Fix:"]),
    (["ddp.check_replicas_every=-1"], ["ddp.check_replicas_every=-1 is out of range", "Fix:"]),
    (["ddp.check_replicas=false", "ddp.check_replicas_every=5"], ["ddp.check_replicas_every is set", "Fix:"]),
    (["ddp.timeout_s=-1"], ["ddp.timeout_s=-1 is out of range", "at least 1", "Fix: ddp.timeout_s=600"]),
    (["ddp.timeout_s=0"], ["ddp.timeout_s=0 is out of range", "at least 1", "Fix: ddp.timeout_s=600"]),
    (["ddp.timeout_s=soon"], ["ddp.timeout_s=soon", "takes a whole number", "Fix:"]),
    (["ddp.bucket_cap_mb=-5"], ["ddp.bucket_cap_mb=-5.0 is out of range", "above 0", "Fix: ddp.bucket_cap_mb=25"]),
    (["ddp.bucket_cap_mb=0"], ["ddp.bucket_cap_mb=0.0 is out of range", "Fix:"]),
    (["ddp.probe_steps=0"], ["ddp.probe_steps=0 is out of range", "at least 1", "Fix: ddp.probe_steps=2"]),
    (["ddp.broadcast_buffers=perhaps"], ["ddp.broadcast_buffers=perhaps", "true or false", "Fix:"]),
    # launcher
    (["launcher=slurm"], ["launcher=slurm", "Available: local, torchrun", "Fix:"]),
    (["launcher.nproc=0"], ["launcher.nproc=0 is out of range", "at least 1", "Fix: launcher.nproc=2"]),
    (["launcher.nproc=-3"], ["launcher.nproc=-3 is out of range", "Fix:"]),
    (["launcher.nproc=abc"], ["launcher.nproc=abc", "takes a whole number", "Fix: launcher.nproc="]),
    (["launcher.threads_per_rank=-2"], ["launcher.threads_per_rank=-2", "Fix: launcher.threads_per_rank=0"]),
    (["launcher.backend=mpi"], ["launcher.backend=mpi is not a valid value", "auto, gloo, nccl", "Fix:"]),
    (["launcher.backend=nccl"], ["launcher.backend=nccl needs one GPU per process", "Fix: launcher.backend=gloo"]),
    (["launcher.master_port=70000"], ["launcher.master_port=70000 is out of range", "1 to 65535", "Fix:"]),
    (["launcher.master_port=-1"], ["launcher.master_port=-1 is out of range", "Fix: launcher.master_port=0"]),
    (["launcher.master_addr=256.1.1.1"], ["launcher.master_addr=256.1.1.1 is neither an IP address", "Fix:"]),
    (["launcher.master_addr=192.0.2.7"], ["launcher.master_addr=192.0.2.7 is not an address of this machine"]),
    (["launcher.grace_s=-1"], ["launcher.grace_s=-1.0 is out of range", "0 or more", "Fix:"]),
    (["launcher.heartbeat_s=1"], ["launcher.heartbeat_s=1.0 is out of range", "Fix: launcher.heartbeat_s=60"]),
    (["launcher.heartbeat_s=-5"], ["launcher.heartbeat_s=-5.0 is out of range", "Fix:"]),
    (["launcher.max_restarts=2"], ["launcher.max_restarts=2 needs launcher=torchrun", "Fix: launcher=torchrun"]),
    (["launcher.nnodes=2"], ["launcher.nnodes=2 needs launcher=torchrun", "Fix:"]),
    (["launcher=torchrun", "launcher.nnodes=0"], ["launcher.nnodes=0 is out of range", "Fix: launcher.nnodes=1"]),
    (["launcher=torchrun", "launcher.node_rank=2"], ["launcher.node_rank=2 is out of range", "0 to 0", "Fix:"]),
    (["launcher=torchrun", "launcher.node_rank=-1"], ["launcher.node_rank=-1 is out of range", "Fix:"]),
    (["launcher=torchrun", "launcher.max_restarts=-1"], ["launcher.max_restarts=-1 is out of range", "Fix:"]),
    (["launcher=torchrun", "launcher.rdzv_endpoint=host:99999"], ["launcher.rdzv_endpoint=host:99999", "Fix:"]),
    (["launcher=torchrun", "launcher.rdzv_backend=zk"], ["launcher.rdzv_backend=zk is not one of", "c10d", "Fix:"]),
    (["launcher=torchrun", "launcher.rdzv_id=a/b"], ["launcher.rdzv_id=a/b", "Fix:"]),
    # memory
    (["memory=huge"], ["memory=huge", "Available: default, lowmem", "Fix:"]),
    (["memory.amp=sometimes"], ["memory.amp=sometimes", "true or false", "Fix: memory.amp="]),
    (["memory.batch_size=0"], ["memory.batch_size=0 is out of range", "at least 1", "Fix:"]),
    (["memory.num_workers=-1"], ["memory.num_workers=-1 is out of range", "Fix: memory.num_workers=0"]),
    (["memory.on_oom=explode"], ["memory.on_oom=explode is not a valid value", "fail, halve", "Fix:"]),
    (["memory.min_batch_size=0"], ["memory.min_batch_size=0 is out of range", "Fix:"]),
    (["memory.on_oom=halve", "memory.min_batch_size=32"], ["memory.min_batch_size=32 is out of range", "(16 per "]),
    (["memory.batch_size=4", "memory.min_batch_size=8"], ["memory.min_batch_size=8 is out of range", "(4 per "]),
    # presets, search path, the root, resume
    (["preset=nosuch"], ["preset=nosuch: there is no such preset", "Available: detection-cpu-smoke", "Fix:"]),
    (["hydra.searchpath=[file:///no/such/folder]"], ["hydra.searchpath names file:///no/such/folder", "Fix:"]),
    (["hydra.searchpath=[file://TEAM]", "preset=broken"], ["not valid YAML", "broken.yaml", "line 3", "Fix:"]),
    (["+nosuchkey=1"], ["nosuchkey is not a known setting", "framework, ddp, launcher, memory", "Fix:"]),
    (["resume=outputs/no/such"], ["resume=outputs/no/such: there is no such folder", "Fix:"]),
    (["trust.allowed_targets=os."], ["trust.allowed_targets=os.", "takes a list", "Fix:"]),
    (["ddp.kwargs=7"], ["ddp.kwargs=7", "takes a mapping", "Fix:"]),
    # sweeps (-m): every job is checked before Hydra writes multirun/
    (["-m", "ddp=safe,fast"], ["sweep job 1 (ddp=fast)", "ddp=fast", "Available:"]),
    (["--multirun", "launcher.nproc=1,0"], ["sweep job 1 (launcher.nproc=0)", "launcher.nproc=0 is out of range"]),
    (["-m", "framework.lr=0.1,-1"], ["sweep job 1 (framework.lr=-1)", "above 0"]),
    (["-m", "ddp.timeout_s=range(0,2)"], ["sweep job 0 (ddp.timeout_s=0)", "at least 1"]),
    # flags
    (["--config-name=other"], ["--config-name is not supported", "preset=<name>"]),
]


def _id(case):
    return " ".join(case[0])


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run train.py's entry point in this process, in an empty folder; returns (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    team = tmp_path / "team"
    (team / "preset").mkdir(parents=True)
    (team / "preset" / "broken.yaml").write_text(BROKEN_YAML)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def call(args):
        args = [a.replace("file://TEAM", f"file://{team}") for a in args]
        code = train_main(args)
        return code, capsys.readouterr().err

    yield call
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_table_covers_every_group():
    assert len(CASES) >= 60
    keys = " ".join(_id(c) for c in CASES)
    for group in ("framework", "ddp", "launcher", "memory", "preset", "hydra.searchpath", "resume", "trust", "-m"):
        assert group in keys


@pytest.mark.parametrize("args,words", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_refused_before_anything_runs(cli, tmp_path, args, words):
    if args == ["launcher.backend=nccl"]:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
            pytest.skip("this machine has a GPU per process")
    code, err = cli(args)
    assert code == 2, err
    assert err.startswith("error: "), err
    for word in words:
        assert word in err, err
    assert "Traceback" not in err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "team")
    assert left == [], f"a refused config must leave nothing behind: {left}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,words",
    [(["-m", "ddp=safe,fast"], ["sweep job 1 (ddp=fast)"]),
     (["launcher=torchrun", "launcher.nnodes=0"], ["launcher.nnodes=0 is out of range"])],
)  # fmt: skip
def test_bad_input_through_a_real_process(workdir, args, words):
    proc = train(workdir, *args)
    assert proc.returncode == 2, output(proc)
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == [] and not (workdir / "multirun").exists()


@pytest.mark.parametrize(
    "framework,module,extra",
    [
        ("mmdet", "mmdet", "mmdet"),
        ("fastnlp", "fastNLP", "fastnlp"),
        ("nnunet", "nnunetv2", "nnunet"),
        ("lightning", "lightning", "lightning"),
        ("accelerate", "accelerate", "accelerate"),
        ("transformers", "transformers", "transformers"),
    ],
)
def test_framework_not_installed_says_what_to_install(cli, framework, module, extra):
    pytest.importorskip("torch")
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed in this environment")
    code, err = cli([f"framework={framework}"])
    assert code == 2, err
    assert f"framework={framework} needs" in err and "not installed" in err
    assert f"pip install -e '.[{extra}]'" in err


@pytest.mark.parametrize(
    "env,named",
    [({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"), ({"WORLD_SIZE": "4", "LOCAL_RANK": "1",
      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK")],
)  # fmt: skip
def test_stale_distributed_variables_are_explained(cli, tmp_path, monkeypatch, env, named):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = cli(["framework.steps=2"])
    assert code == 2, err
    assert "no launcher started this process" in err and named in err
    assert f"Fix: unset {' '.join(k for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE') if k in env)}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team"] and "Traceback" not in err


def test_a_preset_with_a_yaml_error_names_the_file(cli, tmp_path):
    code, err = cli(["hydra.searchpath=[file://TEAM]", "preset=broken"])
    assert code == 2 and str(tmp_path / "team" / "preset" / "broken.yaml") in err, err
    assert textwrap.dedent("expected ',' or ']'") in err
