"""ddp=auto, ddp=ignore and the doctor, on framework=torch: real DDP, 2 processes, gloo on CPU."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from adapters.errors import ConfigError
from adapters.launch import free_port
from adapters.probe import match_ignore, run_probe

from conftest import output, run, run_dirs, train
from my_pkg import TrickyNet

USER = ["framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
        "framework.steps=6", "framework.log_every=3"]  # fmt: skip


def rank_logs(run_dir):
    return [(run_dir / f"rank{r}.log").read_text() for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,choice,ignored", [
    ([], "strict", 0),                                                    # every parameter used
    (["framework.deep_supervision=false"], "ignore", 4),                  # the same heads unused every step
    ([*USER, "+framework.model.unused=alternate"], "find", 0),            # used in some steps only
    ([*USER, "+framework.model.unused=some_ranks"], "find", 0),           # used on some ranks only
])  # fmt: skip
def test_auto_picks_the_cheapest_setting_that_works_and_trains(workdir, overrides, choice, ignored):
    proc = train(workdir, "ddp=auto", *overrides)
    assert proc.returncode == 0, output(proc)
    assert f"ddp=auto chose {choice}" in proc.stdout
    [run_dir] = run_dirs(workdir)
    find = "True" if choice == "find" else "False"
    for log in rank_logs(run_dir):
        assert f"DDP as built: find_unused_parameters={find}" in log and f"ignored={ignored}" in log
    assert "finished:" in proc.stdout and "probe_s=" in proc.stdout


def test_auto_is_the_default(workdir):
    from adapters.config import compose

    assert compose([]).ddp.unused_params.name == "auto"


@pytest.mark.slow
def test_auto_logs_the_parameters_it_leaves_out(workdir):
    proc = train(workdir, "framework.deep_supervision=false", "framework.steps=4")
    assert proc.returncode == 0, output(proc)
    assert "the same 4 parameters got no gradient in every step on every rank" in proc.stdout
    assert "DDP leaves out heads.0: heads.0.weight, heads.0.bias" in proc.stdout
    assert "DDP leaves out heads.1: heads.1.weight, heads.1.bias" in proc.stdout


@pytest.mark.slow
def test_ignore_with_names_and_globs(workdir):
    proc = train(workdir, "framework.deep_supervision=false", "ddp=ignore", "ddp.ignore=[heads.0,heads.1.*]",
                 "framework.steps=4")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    [run_dir] = run_dirs(workdir)
    assert all("ignored=4" in log for log in rank_logs(run_dir))
    assert "probe_s" not in proc.stdout, "named parameters need no probe"


@pytest.mark.slow
def test_ignore_refuses_parameters_that_some_steps_use(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=alternate", "ddp=ignore")
    assert proc.returncode == 1, output(proc)
    assert "ddp=ignore: the probe found parameters unused only in some steps or on some ranks" in proc.stderr
    assert "ddp=safe" in proc.stderr


@pytest.mark.slow
def test_strict_stops_after_the_first_step(workdir):
    proc = train(workdir, "framework.deep_supervision=false", "ddp=strict")
    assert proc.returncode == 1, output(proc)
    assert "heads.0 (ranks 0, 1): heads.0.weight, heads.0.bias" in proc.stderr
    [run_dir] = run_dirs(workdir)
    for log in rank_logs(run_dir):
        assert "ctx.first_step_done()" in log, "raised by the check after step 1's backward, not step 2's forward"


@pytest.mark.slow
def test_find_that_finds_nothing_says_strict_is_faster(workdir):
    proc = train(workdir, "ddp=safe", "framework.steps=12", "framework.log_every=6")
    assert proc.returncode == 0, output(proc)
    assert "find_unused_parameters=True found no unused parameters" in proc.stdout
    assert "ddp=strict would be faster" in proc.stdout


@pytest.mark.slow
def test_doctor_reports_without_training(workdir):
    proc = run([sys.executable, "-m", "adapters", "doctor", *USER, "+framework.model.unused=aux"], workdir)
    assert proc.returncode == 0, output(proc)
    out = proc.stdout
    assert "Unused in every step on every rank (5; while unused their gradients stay None" in out
    assert "aux.proj (ranks 0, 1): aux.proj.weight, aux.proj.bias" in out
    assert "aux_tied (ranks 0, 1): aux_tied.bias" in out
    assert "Recommended: ddp=ignore" in out
    assert "step 3/6" not in out and not list(workdir.glob("outputs/*/*/model.pt")), "no training"


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_probe_changes_nothing(one_rank_group):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1),
                                torch.nn.Linear(8, 1))  # fmt: skip
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter([torch.randn(6, 4) for _ in range(3)])
    rng = torch.get_rng_state()

    def step(x):
        model[2](torch.nn.functional.dropout(model[1](model[0](x)), 0.5)).sum().backward()

    result = run_probe(model, batches, step, steps=2)
    assert result.never_used == ["3.weight", "3.bias"] and result.decision()[0].name == "ignore"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights and BatchNorm statistics restored"
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_ignore_patterns_name_what_they_match():
    model = TrickyNet()
    assert match_ignore(model, ["aux", "aux_tied.bias"]) == ["aux.proj.weight", "aux.proj.bias", "aux.out.weight",
                                                             "aux.out.bias", "aux_tied.bias"]  # fmt: skip
    assert match_ignore(model, ["blocks.*.weight"]) == ["blocks.inner.1.0.weight"]
    with pytest.raises(ConfigError, match="'auxx' matches no trainable parameter of the model. Close: aux"):
        match_ignore(model, ["auxx"])
