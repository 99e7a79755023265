"""Test sessions, one environment per framework.

`python3 -m nox` runs the default sessions (lint, torch and one per framework). Each framework gets its own
environment: fastNLP pins rich==11.2.0, which mmengine cannot use, so they never share one.

Each framework session removes its environment when it ends (nox recreates it on the next run anyway), so the
whole command needs the disk of its largest environment, not of all seven: nnU-Net's alone is about 6.5 GB.
`nox -r` (reuse the environments) keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import nox

nox.options.sessions = ["lint", "torch", "mmdet", "fastnlp", "nnunet", "lightning", "huggingface"]
nox.options.error_on_missing_interpreters = True

# A CPU build of torch that lies on this project's machines' disk; any torch>=2.1 works elsewhere.
TORCH = os.environ.get("ADAPTERS_TORCH", "torch==2.13.0")
# torchvision (nnU-Net imports it through timm) lies on the disk for torch 2.14.1 only, as a CUDA build.
TORCH_VISION = ("torch==2.14.1", "torchvision==0.29.1")


def _need_disk(session: nox.Session, gib: float) -> None:
    """Stop at once, with the figures, where the environment cannot fit (not halfway through pip)."""
    where = os.path.dirname(session.virtualenv.location)
    free = shutil.disk_usage(where).free / 2**30
    if free < gib:
        session.error(
            f"this session's environment needs about {gib:.0f} GiB of disk; {free:.1f} GiB free at {where}. "
            "Fix: free disk there (old .nox environments, pip's cache: pip cache purge), then run it again"
        )


@contextlib.contextmanager
def _own_environment(session: nox.Session, gib: float) -> Iterator[None]:
    """A framework session's environment: checked for disk first, removed when the session is done with it (pass
    or fail), unless environments are being reused (`nox -r`)."""
    _need_disk(session, gib)
    try:
        yield
    finally:
        env = session.virtualenv
        if not getattr(env, "reuse_existing", False) and os.path.isdir(env.location):
            shutil.rmtree(env.location, ignore_errors=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(name="torch")
def torch_(session: nox.Session) -> None:
    """The core and framework=torch: real DDP, several processes, gloo on CPU (nccl where GPUs are)."""
    with _own_environment(session, 3):
        session.install(TORCH, "-e", ".[test]")
        session.run("pytest", "--durations=20", *session.posargs)  # the slowest tests, to keep the session lean


@nox.session
def mmdet(session: nox.Session) -> None:
    """framework=mmdet: MMDetection 3.3 on mmengine 0.10 and mmcv 2.1 built from source.

    No prebuilt mmcv wheel is reachable: the first build takes about 20 minutes on 2 cores; pip caches the
    wheel, so later sessions install it in seconds. setuptools<81: mmcv's build imports pkg_resources.
    """
    with _own_environment(session, 4):
        session.install(TORCH, "setuptools<81", "wheel", "numpy")
        session.install("--no-build-isolation", "mmcv==2.1.0", env={"MMCV_WITH_OPS": "1", "FORCE_CUDA": "0"})
        session.install("-e", ".[mmdet,test]")
        session.run("pytest", "tests/test_mmdet.py", *session.posargs, env={"ADAPTERS_REQUIRE": "mmdet"})


@nox.session
def fastnlp(session: nox.Session) -> None:
    """framework=fastnlp: fastNLP 1.0.1 (pins rich==11.2.0, so never in the mmdet environment)."""
    with _own_environment(session, 3):
        session.install(TORCH, "-e", ".[fastnlp,test]")
        session.run("pytest", "tests/test_fastnlp.py", *session.posargs, env={"ADAPTERS_REQUIRE": "fastnlp"})


@nox.session
def nnunet(session: nox.Session) -> None:
    """framework=nnunet: nnU-Net v2.8 (needs torchvision through timm: torch 2.14.1 + torchvision 0.29.1)."""
    with _own_environment(session, 9):
        session.install(*TORCH_VISION, "-e", ".[nnunet,test]")
        session.run("pytest", "tests/test_nnunet.py", *session.posargs, env={"ADAPTERS_REQUIRE": "nnunet"})


@nox.session
def lightning(session: nox.Session) -> None:
    """framework=lightning: PyTorch Lightning 2.6's Trainer with its DDPStrategy."""
    with _own_environment(session, 3):
        session.install(TORCH, "-e", ".[lightning,test]")
        session.run("pytest", "tests/test_lightning.py", *session.posargs, env={"ADAPTERS_REQUIRE": "lightning"})


@nox.session
def huggingface(session: nox.Session) -> None:
    """framework=accelerate and framework=transformers: one environment (transformers' Trainer runs on accelerate).
    transformers 5.x needs Python 3.11 or later."""
    with _own_environment(session, 3):
        session.install(TORCH, "-e", ".[transformers,test]")
        session.run("pytest", "tests/test_accelerate.py", "tests/test_transformers.py", *session.posargs,
                    env={"ADAPTERS_REQUIRE": "accelerate,transformers"})  # fmt: skip


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Install and run the built-in demo: `nox -s demo -- ddp=safe framework.deep_supervision=false`."""
    session.install(TORCH, "-e", ".")
    session.run("python", "train.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: the settings side by side (and auto's probe and guard), framework=torch against a
    hand-written DDP loop, then (queued after it, each in its own environment) every framework against its
    own launch. Arguments go to the first: `nox -s bench -- --rounds 100`."""
    session.install(TORCH, "-e", ".")
    session.run("python", "benchmarks/ddp_policies.py", *session.posargs)
    session.run("python", "benchmarks/vs_handwritten.py")
    for name in ("bench-fastnlp", "bench-nnunet", "bench-mmdet", "bench-lightning", "bench-transformers"):
        session.notify(name, posargs=[])  # their own defaults


def _bench_native(session: nox.Session, framework: str) -> None:
    session.run("python", "benchmarks/vs_native.py", "--framework", framework, *session.posargs)


@nox.session(name="bench-fastnlp", default=False)
def bench_fastnlp(session: nox.Session) -> None:
    """framework=fastnlp against fastNLP's Trainer in a script of one's own, side by side."""
    session.install(TORCH, "-e", ".[fastnlp]")
    _bench_native(session, "fastnlp")


@nox.session(name="bench-mmdet", default=False)
def bench_mmdet(session: nox.Session) -> None:
    """framework=mmdet against mmengine's Runner from the same config, side by side (needs mmcv: see mmdet)."""
    session.install(TORCH, "setuptools<81", "wheel", "numpy")
    session.install("--no-build-isolation", "mmcv==2.1.0", env={"MMCV_WITH_OPS": "1", "FORCE_CUDA": "0"})
    session.install("-e", ".[mmdet]")
    _bench_native(session, "mmdet")


@nox.session(name="bench-nnunet", default=False)
def bench_nnunet(session: nox.Session) -> None:
    """framework=nnunet against nnU-Net's own trainer run directly, side by side."""
    session.install(*TORCH_VISION, "-e", ".[nnunet]")
    _bench_native(session, "nnunet")


@nox.session(name="bench-lightning", default=False)
def bench_lightning(session: nox.Session) -> None:
    """framework=lightning against Lightning's Trainer with strategy="ddp_find_unused_parameters_true"."""
    session.install(TORCH, "-e", ".[lightning]")
    _bench_native(session, "lightning")


@nox.session(name="bench-transformers", default=False)
def bench_transformers(session: nox.Session) -> None:
    """framework=transformers against the Trainer with its own DDP default, side by side."""
    session.install(TORCH, "-e", ".[transformers]")
    _bench_native(session, "transformers")
