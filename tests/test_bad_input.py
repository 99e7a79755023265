"""Bad input through the real command line: a clear message, a non-zero exit, and no run folder."""

from __future__ import annotations

import pytest

from conftest import output, run_dirs, train

CASES = {
    # override(s): words the message must contain
    "ddp=fast": ["ddp=fast", "Available: auto, debug, ignore, safe, static, strict"],
    "ddp.unused_params=findd": ["ddp.unused_params=findd is not a valid value", "strict, find, static, ignore, auto"],
    "ddp.unusd_params=find": ["ddp.unusd_params is not a known setting", "Did you mean ddp.unused_params?"],
    "+ddp.unusd_params=find": ["ddp.unusd_params is not a known setting", "Did you mean ddp.unused_params?"],
    "framework=keras": ["framework=keras", "Available: fastnlp, mmdet, nnunet, torch"],
    "launcher.nproc=0": ["launcher.nproc=0", "at least 1"],
    "ddp.ignore=[aux]": ["ddp.ignore is set, but ddp.unused_params=auto", "ddp=ignore"],
    "ddp.debug=loud": ["ddp.debug=loud is not a valid value", "off, info, detail"],
    "framework.steps=many": ["framework.steps", "could not be converted to Integer"],
    "framework.model._target_=no_such_pkg.Net": ["framework.model._target_=no_such_pkg.Net cannot be imported"],
    "+ddp.kwargs.static_graph=true": ["ddp.kwargs.static_graph cannot be passed through", "ddp.unused_params=static"],
    "ddp.on_ignored_grad=maybe": ["ddp.on_ignored_grad=maybe is not a valid value", "sync, fail"],
    "ddp.check_replicas_every=-1": ["ddp.check_replicas_every=-1 must be 0"],
    "launcher.threads_per_rank=-2": ["launcher.threads_per_rank=-2", "launcher.threads_per_rank=0"],
    "launcher.backend=nccl": ["launcher.backend=nccl needs one GPU per process", "launcher.backend=gloo"],
}


@pytest.mark.parametrize("override", sorted(CASES))
def test_bad_input_is_refused_before_anything_runs(workdir, override):
    if override == "launcher.backend=nccl":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
            pytest.skip("this machine has a GPU per process")
    proc = train(workdir, override)
    assert proc.returncode == 2, output(proc)
    for words in CASES[override]:
        assert words in proc.stderr, proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == [], "a refused config must leave nothing behind"


@pytest.mark.parametrize(
    "framework,module,extra",
    [("mmdet", "mmdet", "mmdet"), ("fastnlp", "fastNLP", "fastnlp"), ("nnunet", "nnunetv2", "nnunet")],
)
def test_framework_not_installed_says_what_to_install(workdir, framework, module, extra):
    pytest.importorskip("torch")
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed in this environment")
    proc = train(workdir, f"framework={framework}")
    assert proc.returncode == 2, output(proc)
    assert f"framework={framework} needs" in proc.stderr and "not installed" in proc.stderr
    assert f"pip install -e '.[{extra}]'" in proc.stderr
    assert run_dirs(workdir) == []
