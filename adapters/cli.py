"""Command lines: ``train.py`` (through ``train_main``) and ``python -m adapters explain``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from . import lifetime, threads, world  # world registers the run-folder resolver for unpickled jobs
from .config import _override_key
from .errors import AdapterError, ConfigError

log = logging.getLogger("adapters")


def _fail(exc: AdapterError) -> int:
    sys.stderr.write(f"error: {exc}\n")
    sys.stderr.flush()
    return exc.exit_code


# --- train.py ---------------------------------------------------------------------------------------

_LOCAL_RANK_ARG = re.compile(r"^--local[-_]rank(?:=(\d+))?$")


def _strip_local_rank(argv: list[str]) -> list[str]:
    """``python -m torch.distributed.launch`` passes --local-rank=N, which Hydra would reject."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        match = _LOCAL_RANK_ARG.match(arg)
        if match:
            value = match.group(1)
            if value is None and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            os.environ.setdefault("LOCAL_RANK", value or "0")
            continue
        out.append(arg)
    return out


def _task(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .config import validate
    from .launch import launch
    from .presets import check_trust, config_sources

    world.adopt_submitit()
    try:
        runtime = HydraConfig.get()
        choices = {k: v for k, v in runtime.runtime.choices.items() if "hydra/" not in k}
        check_trust(choices, config_sources(list(runtime.overrides.task)), list(cfg.trust.allowed_targets))
        # train_main checked this run's config (every job of a sweep) in this process already: the
        # framework's own checks (a model's forward, for the contract) are not run twice.
        checked = validate(cfg, framework_checks=not _checked_here)
        run_dir = Path(runtime.runtime.output_dir)
        summary = launch(checked, run_dir)
    except AdapterError as exc:
        sys.exit(_fail(exc))
    if summary:
        log.info("finished: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))


# Hydra's flags that only print (help, the config, shell completion): nothing runs and nothing is written.
_PRINT_ONLY = ("help", "hydra_help", "info", "cfg", "shell_completion", "version")
_run_dir: str | None = None  # the folder this launcher's run writes to, for the interrupted message
_checked_here = False  # train_main validated every job's config in this process


def train_main(argv: Sequence[str] | None = None) -> int:
    """Check the overrides, reserve the run's folder, then run the Hydra app. Nothing is written when the
    config is wrong. Ctrl-C, SIGTERM and SIGHUP stop every rank and end with one line."""
    here = world.World.detect()
    if not here.in_place:
        lifetime.install_stop_signals()
    elif here.starter == "torchrun":  # a torchrun worker: end with the agent, however it ends
        lifetime.die_with_parent(kernel=False)
    try:
        return _train_main(list(sys.argv[1:] if argv is None else argv))
    except (KeyboardInterrupt, lifetime.Interrupted) as exc:
        where = f", logs in {_run_dir}" if _run_dir else ""
        sys.stderr.write(f"interrupted ({lifetime.describe(exc)}): ranks stopped{where}\n")
        sys.stderr.flush()
        return lifetime.exit_code(exc)


def _train_main(argv: list[str]) -> int:
    import hydra
    from hydra._internal.utils import get_args_parser

    from .config import compose, validate
    from .schemas import conf_dir, register_configs

    global _run_dir, _checked_here
    argv = _strip_local_rank(argv)
    args = get_args_parser().parse_args(argv)  # a wrong flag: argparse's usage line and exit code 2
    print_only = any(getattr(args, name, None) for name in _PRINT_ONLY)
    try:
        world.check_launch_env()
        here = world.World.detect()
        for name in ("config_path", "config_name", "experimental_rerun"):
            if getattr(args, name, None):
                raise ConfigError(
                    f"--{name.replace('_', '-')} is not supported by train.py: it composes this project's "
                    "conf/config.yaml. Pick options with group=option (ddp=safe), add config folders with "
                    "hydra.searchpath=[file://...], and share settings as presets (preset=<name>)."
                )
        checked = None
        if print_only and not any(getattr(args, n, None) for n in ("help", "hydra_help", "shell_completion")):
            compose(args.overrides)  # what --cfg and --info show is checked like a run: no shared hydra.* runs
        if not print_only:
            jobs = sweep_jobs(args.overrides) if args.multirun else [args.overrides]
            elsewhere = any(o.startswith("hydra/launcher=") and "basic" not in o for o in args.overrides)
            for i, job in enumerate(jobs):
                try:
                    checked = validate(compose(job), for_run=not elsewhere)
                except AdapterError as exc:
                    if len(jobs) > 1:
                        exc.args = (f"sweep job {i} ({' '.join(job)}): {exc}",)
                    raise
            _checked_here = not elsewhere
            if not args.multirun and checked.launcher.name.name == "torchrun" and not here.in_place:
                check_named_run_dir(args.overrides, checked.resume)
                return _hand_to_torchrun(checked.launcher, argv)
        register_configs()
        if not print_only and args.multirun:
            if not any(_override_key(o) == "hydra.sweep.dir" for o in args.overrides):
                _run_dir = str(reserve_run_dir(Path("multirun"), "sweep"))
                argv.append(f"hydra.sweep.dir={_run_dir}")
        elif not print_only:
            _run_dir = choose_run_dir(args.overrides, checked)
            if _run_dir is not None:
                argv.append(f"hydra.run.dir={_run_dir}")
    except AdapterError as exc:
        return _fail(exc)
    here = world.World.detect()
    if not here.in_place:  # jobs started from here (submitit's) put their folders under the same start time
        os.environ.setdefault(world.START_VAR, repr(world.run_start()))
    else:
        # Every rank runs this app; the run folder is shared (see choose_run_dir) and only rank 0
        # writes .hydra/. Logging is set up per rank by the worker.
        argv.append("hydra/job_logging=none")
        if not here.is_main:
            argv.append("hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)
    if not here.in_place:
        main()
        return 0
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # A torchrun rank exits without interpreter shutdown: gloo's threads can abort a normal exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs ``-m`` will run, one list of overrides each, expanded as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as exc:
        fix = "Fix: sweep a key over values, e.g. -m ddp=safe,static."
        raise ConfigError(f"The sweep could not be read: {exc}\n{fix}") from None


def reserve_run_dir(root: Path, kind: str = "run") -> Path:
    """A new folder <root>/<date>/<time> (or <time>-2, -3 ...) that no other run has: ``mkdir`` fails when the
    name is taken, so two runs started in the same second, here or on another machine sharing the disk, each
    get their own."""
    import itertools

    start = time.localtime(world.run_start())
    day = root / time.strftime("%Y-%m-%d", start)
    day.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H-%M-%S", start)
    for n in itertools.count(1):
        path = day / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def check_named_run_dir(overrides: Sequence[str], resume: Any) -> bool:
    """True when the command line names the run folder (hydra.run.dir); refused if another run is in it."""
    named = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == "hydra.run.dir"), None)
    if named is None:
        return False
    folder = Path(named).expanduser()
    taken = folder.is_dir() and any(folder.iterdir())
    if taken and not world.World.detect().in_place:  # a torchrun rank sees its peers' logs there: the launcher checked
        if resume is None or Path(str(resume)).resolve() != folder.resolve():
            raise ConfigError(
                f"hydra.run.dir={named} already holds a run; a new run never writes into another's folder.\n"
                f"Fix: resume={named} to continue that run from its checkpoint, or name a new folder (or drop "
                "hydra.run.dir: every run gets a folder of its own)."
            )
    return True


def choose_run_dir(overrides: Sequence[str], checked: Any) -> str | None:
    """The run's folder: the one named by resume=, or hydra.run.dir=, or a new one of its own.

    Under torchrun the global rank 0 chooses and publishes its choice in torchrun's store, where the other
    ranks (on every node) and restarted workers find it: one folder per run, and a restart continues in it.
    Returns None when the command line names the folder itself (hydra.run.dir).
    """
    resume = checked.resume
    if check_named_run_dir(overrides, resume):
        return None
    if resume is not None:
        return str(resume)
    here = world.World.detect()
    if not here.in_place:
        return str(reserve_run_dir(Path("outputs")))
    shared = here.shared("run_dir", lambda: reserve_run_dir(Path("outputs")), timeout_s=600)
    if shared is None:  # a launcher without torchrun's store: every rank derives the folder from the start time
        start = time.localtime(world.run_start())
        return str(Path("outputs") / time.strftime("%Y-%m-%d", start) / time.strftime("%H-%M-%S", start))
    return shared


def _hand_to_torchrun(launcher: Any, argv: list[str]) -> int:
    """launcher=torchrun: this machine's torchrun agent starts the workers, each running this app as one rank.

    The agent runs in a session of its own, so Ctrl-C and a closed terminal reach this process only; it passes
    them on as SIGTERM, on which the agent stops its workers. If this process is killed outright, Linux kills
    the agent (PR_SET_PDEATHSIG) and each worker, seeing its agent gone, stops itself.
    """
    import subprocess

    if launcher.nnodes == 1:  # one machine: a free port and a fresh run id, so concurrent runs never meet
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--rdzv_backend={launcher.rdzv_backend}", f"--rdzv_endpoint={launcher.rdzv_endpoint}",
                      f"--rdzv_id={launcher.rdzv_id}"]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={launcher.nnodes}",
        f"--node_rank={launcher.node_rank}", f"--nproc_per_node={launcher.nproc}", *rendezvous,
        f"--max_restarts={launcher.max_restarts}", "-m", "adapters.cli", *argv,
    ]  # fmt: skip
    # torchrun would set OMP_NUM_THREADS=1 where it is unset; give each worker its share of the cores instead.
    n_threads, _ = threads.plan(launcher.threads_per_rank, launcher.nproc, os.environ)
    env = {**os.environ, **threads.env_for(n_threads)}
    # The workers run `-m adapters.cli` from this directory: make this package importable there even when it
    # is not installed (train.py run from elsewhere, next to its adapters/ folder).
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    print(f"handing the run to torchrun: {' '.join(cmd[1:])}", flush=True)
    agent = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lifetime.kill_me_with_parent,
                             stderr=subprocess.PIPE)  # fmt: skip
    stopping = threading.Event()

    def relay() -> None:  # the agent's and the workers' stderr, until this process stops them
        for line in iter(agent.stderr.readline, b""):
            if not stopping.is_set():
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

    relaying = threading.Thread(target=relay, name="torchrun-stderr", daemon=True)
    relaying.start()
    try:
        code = agent.wait()
        relaying.join(timeout=5)
        return code
    except BaseException:
        stopping.set()  # the agent's own account of the signal (a traceback) is not the user's business
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
        raise


# --- python -m adapters -----------------------------------------------------------------------------


def explain(overrides: Sequence[str], as_json: bool = False) -> str:
    """The composed policy and the exact native settings it becomes, without importing the framework."""
    from . import registry
    from .config import compose, resolve_backend, validate

    cfg, choices = compose(list(overrides), with_choices=True)
    checked = validate(cfg, for_run=False)
    adapter = registry.load_adapter(checked.framework)
    backend = resolve_backend(checked.launcher.backend, checked.launcher.nproc)
    native = adapter.translate(checked.policy, backend=backend)
    memory = adapter.memory_settings(checked.memory, checked.framework_cfg, backend=backend,
                                     world_size=checked.launcher.nproc)  # fmt: skip
    ddp = OmegaConf.to_container(cfg.ddp, enum_to_str=True)
    if as_json:
        return json.dumps(
            {"framework": checked.framework, "ddp_preset": choices.get("ddp"), "preset": choices.get("preset"),
             "policy": ddp,
             "backend": backend.name, "settings": dict(native.settings), "env": dict(native.env),
             "snippet": native.snippet, "notes": list(native.notes),
             "framework_changes": adapter.explain_framework(checked.framework_cfg), "memory": memory.shown()},
            indent=2, default=str,
        )  # fmt: skip
    entry = registry.entry(checked.framework)
    preset = f"    preset: {choices['preset']}" if choices.get("preset") else ""
    out = [
        f"framework: {checked.framework} ({entry.title})    ddp preset: {choices.get('ddp')}{preset}",
        "",
        "policy (ddp):",
        _indent(OmegaConf.to_yaml(OmegaConf.create(ddp)).rstrip()),
        "",
        f"launcher: {checked.launcher.name.name}, {checked.launcher.nproc} process(es), backend "
        f"{backend.name}{' (auto)' if checked.launcher.backend.name == 'auto' else ''}",
        "",
        f"native settings for {entry.title}:",
        _indent(OmegaConf.to_yaml(OmegaConf.create(dict(native.settings))).rstrip()),
        "in code:",
        _indent(native.snippet),
        "environment in every rank: "
        + (", ".join(f"{k}={v}" for k, v in native.env.items()) if native.env else "(nothing set)"),
    ]
    memory_text = memory.line() or "the framework's own settings"
    out += ["", f"memory (memory.*): {memory_text}"]
    changes = adapter.explain_framework(checked.framework_cfg)
    if changes:
        out += ["", f"also changed in {entry.title} for this run:", *[f"  {line}" for line in changes]]
    if native.notes:
        out += ["", "notes:", *[f"  - {note}" for note in native.notes]]
    return "\n".join(out)


def doctor(overrides: Sequence[str]) -> str:
    """Run only the first ddp.probe_steps training steps, on every rank, and report which parameters got no gradient
    (nothing is saved)."""
    from .config import compose, validate
    from .launch import launch

    checked = validate(compose(list(overrides)))
    run_dir = reserve_run_dir(Path("outputs"))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    summary = launch(checked, run_dir.resolve(), probe_only=True)
    return f"{summary['probe'].report()}\n(logs: {run_dir}/rank<N>.log)"


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def module_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adapters",
        description="One DDP unused-parameters policy for PyTorch, MMDetection, fastNLP and nnU-Net.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="print the composed policy and the framework's native settings")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (framework=mmdet ddp=safe)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("presets", help="list the presets visible now, where each comes from and what it sets")
    p.add_argument("overrides", nargs="*", help="e.g. hydra.searchpath=[file://path/to/team-presets]")
    sub.add_parser("nnunet-trainers", help="print the folder to put in nnUNet_extTrainer for nnUNetv2_train -tr "
                   "nnUNetTrainerPolicy")  # fmt: skip
    p = sub.add_parser(
        "doctor",
        help="run only the first training steps (ddp.probe_steps) on every rank, report the "
        "parameters that got no gradient",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            print(explain(args.overrides, as_json=args.json))
        elif args.command == "presets":
            from .presets import format_presets, list_presets

            print(format_presets(list_presets(args.overrides)))
        elif args.command == "nnunet-trainers":
            from .frameworks.nnunet import EXT_TRAINERS

            print(EXT_TRAINERS)
        elif args.command == "doctor":
            print(doctor(args.overrides))
    except AdapterError as exc:
        return _fail(exc)
    except KeyboardInterrupt as exc:
        sys.stderr.write("interrupted (Ctrl-C): ranks stopped\n")
        return lifetime.exit_code(exc)
    return 0


if __name__ == "__main__":  # what launcher=torchrun runs in each worker (python -m adapters.cli <overrides>)
    sys.exit(train_main())
