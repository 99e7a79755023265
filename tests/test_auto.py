"""ddp=auto, ddp=ignore and the doctor, on framework=torch: real DDP, 2 processes, gloo on CPU.

auto decides from the run's own first steps: the run with auto and the run with the setting it chose, set by
hand, end with bit-equal weights.
"""

from __future__ import annotations

import sys

import pytest

from adapters.errors import ConfigError
from adapters.ignorelist import match_ignore

from conftest import output, replica_digests, run, run_dirs, train
from my_pkg import TrickyNet

USER = ["framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
        "framework.steps=6", "framework.log_every=3"]  # fmt: skip


def rank_logs(run_dir):
    return [(run_dir / f"rank{r}.log").read_text() for r in (0, 1)]


# model overrides -> what auto chooses, the parameters it leaves out, and the same setting by hand
CHOICES = {
    "every parameter used": ([], "strict", 0, ["ddp=strict"]),
    "the same heads unused every step": (
        ["framework.deep_supervision=false"],
        "ignore",
        4,
        ["ddp=ignore", "ddp.ignore=[heads.0,heads.1.*]"],  # a module name and a glob
    ),  # fmt: skip
    "used in some steps only": ([*USER, "+framework.model.unused=alternate"], "find", 0, ["ddp=safe"]),
    "used on some ranks only": ([*USER, "+framework.model.unused=some_ranks"], "find", 0, ["ddp=safe"]),
    "reentrant checkpointing, a changing set": (
        [*USER, "+framework.model.unused=alternate", "+framework.model.checkpoint=reentrant"],
        "ignore",
        6,
        ["ddp=ignore", "ddp.ignore=[aux,aux_tied.bias]"],
    ),  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CHOICES))
def test_auto_is_the_run_of_the_setting_it_chose(workdir, case):
    overrides, choice, ignored, by_hand = CHOICES[case]
    proc = train(workdir / "auto", "ddp=auto", *overrides)
    assert proc.returncode == 0, output(proc)
    assert f"ddp=auto chose {choice}" in proc.stdout
    [run_dir] = run_dirs(workdir / "auto")
    find = "True" if choice == "find" else "False"
    for log in rank_logs(run_dir):
        assert f"DDP as built: find_unused_parameters={find}" in log and f"ignored={ignored}" in log
    assert "finished:" in proc.stdout and "observed_s=" in proc.stdout
    if choice == "ignore" and case.startswith("the same heads"):
        assert "the same 4 parameters got no gradient in every observed step on every rank" in proc.stdout
        assert "DDP leaves out heads.0: heads.0.weight, heads.0.bias" in proc.stdout
        assert "DDP leaves out heads.1: heads.1.weight, heads.1.bias" in proc.stdout
    hand = train(workdir / "hand", *by_hand, *overrides)
    assert hand.returncode == 0, output(hand)
    [hand_dir] = run_dirs(workdir / "hand")
    if "ddp=ignore" in by_hand:  # names and globs, and no observed steps for them
        assert all(f"ignored={ignored}" in log for log in rank_logs(hand_dir)) and "observed_s" not in hand.stdout
    assert replica_digests(run_dir)[0] == replica_digests(hand_dir)[0], "auto's run is the chosen setting's run"


def test_auto_is_the_default(workdir):
    from adapters.config import compose

    assert compose([]).ddp.unused_params.name == "auto"


@pytest.mark.slow
def test_ignore_refuses_parameters_that_some_steps_use(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=alternate", "ddp=ignore")
    assert proc.returncode == 1, output(proc)
    assert "ddp=ignore: in the first 2 training steps some parameters were unused only in some steps" in proc.stderr
    assert "ddp=safe" in proc.stderr


@pytest.mark.slow
def test_strict_stops_after_the_first_step(workdir):
    proc = train(workdir, "framework.deep_supervision=false", "ddp=strict")
    assert proc.returncode == 1, output(proc)
    assert "heads.0 (ranks 0, 1): heads.0.weight, heads.0.bias" in proc.stderr
    [run_dir] = run_dirs(workdir)
    for log in rank_logs(run_dir):
        raised = log.split("Traceback")[1]
        assert "step 2/" not in log and "in train_step" in raised and ".backward()" in raised, "in step 1's backward"


@pytest.mark.slow
def test_find_that_finds_nothing_says_strict_is_faster(workdir):
    proc = train(workdir, "ddp=safe", "framework.steps=12", "framework.log_every=6")
    assert proc.returncode == 0, output(proc)
    assert "no rank left a parameter unused in any step of this run" in proc.stdout
    assert "ddp=strict would be faster" in proc.stdout


@pytest.mark.slow
def test_find_says_nothing_of_strict_when_a_later_step_on_one_rank_left_a_parameter_unused(workdir):
    # used everywhere except on rank 1 from step 5 on: DDP's own samples on rank 0 would show nothing
    proc = train(workdir, "ddp=safe", *USER, "+framework.model.unused=some_ranks_late", "+framework.model.late_from=5")
    assert proc.returncode == 0, output(proc)
    assert "strict would be faster" not in proc.stdout


@pytest.mark.slow
def test_doctor_reports_without_training(workdir):
    proc = run([sys.executable, "-m", "adapters", "doctor", *USER, "+framework.model.unused=aux"], workdir)
    assert proc.returncode == 0, output(proc)
    out = proc.stdout
    assert "Unused in every step on every rank (5; while unused their gradients stay None" in out
    assert "aux.proj (ranks 0, 1): aux.proj.weight, aux.proj.bias" in out
    assert "aux_tied (ranks 0, 1): aux_tied.bias" in out
    assert "Recommended: ddp=ignore" in out
    assert "step 3/6" not in out and not list(workdir.glob("outputs/*/*/model.pt")), "the first 2 steps, nothing saved"


def test_ignore_patterns_name_what_they_match():
    model = TrickyNet()
    assert match_ignore(model, ["aux", "aux_tied.bias"]) == ["aux.proj.weight", "aux.proj.bias", "aux.out.weight",
                                                             "aux.out.bias", "aux_tied.bias"]  # fmt: skip
    assert match_ignore(model, ["blocks.*.weight"]) == ["blocks.inner.1.0.weight"]
    with pytest.raises(ConfigError, match="'auxx' matches no trainable parameter of the model. Close: aux"):
        match_ignore(model, ["auxx"])
