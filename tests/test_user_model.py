"""Bring your own model and data: exact names for any parameter layout, and no rank left hanging."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adapters.diagnose import parameter_aliases, reducer_parameter_names

from conftest import output, run_dirs, train
from my_pkg import TrickyNet

USER = ["framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
        "framework.steps=6", "framework.log_every=2"]  # fmt: skip
AUX_UNUSED = ["aux.proj.weight", "aux.proj.bias", "aux.out.weight", "aux.out.bias", "aux_tied.bias"]


@pytest.fixture
def one_rank_group():
    from adapters.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_names_match_ddps_own_index_mapping(one_rank_group):
    model = TrickyNet()
    ddp = DistributedDataParallel(model)
    params, _ = ddp._build_params_for_reducer()
    torch_names = ddp._build_debug_param_to_name_mapping(params)  # filled only in debug mode; rebuild below
    ours = reducer_parameter_names(model)
    assert len(ours) == len(params)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert ours == [by_id[id(p)] for p in params]
    aliases = parameter_aliases(model)
    if torch_names:  # torch's debug mapping names a tied parameter by its last name, ours by the reducer's
        for i, name in enumerate(ours):
            assert torch_names[i].lstrip(".") in [name, *aliases.get(name, [])]
    assert "frozen" not in ours and "scale" in ours and "reuse.weight" not in ours
    assert parameter_aliases(model)["aux.out.weight"] == ["aux_tied.weight"]
    del ddp


def test_ignored_parameters_shift_the_indices_like_ddp(one_rank_group):
    model = TrickyNet()
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["stem.weight"])
    ddp = DistributedDataParallel(model)
    params, _ = ddp._build_params_for_reducer()
    names = reducer_parameter_names(model, ddp.parameters_to_ignore)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert names == [by_id[id(p)] for p in params] and "stem.weight" not in names
    del ddp


@pytest.mark.slow
def test_strict_names_a_user_models_unused_parameters_exactly(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=aux", "ddp=strict", "ddp.debug=info")
    assert proc.returncode == 1, output(proc)
    err = proc.stderr
    assert "DDP stopped on ranks 0, 1: 5 parameters got no gradient" in err
    assert "aux.proj (ranks 0, 1): aux.proj.weight, aux.proj.bias" in err
    assert "aux.out (ranks 0, 1): aux.out.weight, aux.out.bias" in err
    assert "aux_tied (ranks 0, 1): aux_tied.bias" in err
    assert "(aux.out.weight is shared; also reachable as aux_tied.weight)" in err
    # torch's own names (debug INFO) agree with ours, in every rank.
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        text = (run_dir / f"rank{rank}.log").read_text()
        listed = text.split(f"Parameters which did not receive grad for rank {rank}: ")[1].splitlines()[0]
        tied = {"aux_tied.weight": "aux.out.weight"}
        assert sorted(tied.get(n, n) for n in listed.split(", ")) == sorted(AUX_UNUSED)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["safe", "static"])
def test_user_model_trains_with_the_fix(workdir, preset):
    proc = train(workdir, *USER, "+framework.model.unused=aux", f"ddp={preset}")
    assert proc.returncode == 0, output(proc)
    assert "step 6/6" in proc.stdout


@pytest.mark.slow
def test_static_graph_with_a_changing_graph_is_explained(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=alternate", "ddp=static")
    assert proc.returncode == 1, output(proc)
    assert "static_graph=True, but the set of parameters used changed" in proc.stderr
    assert "  ddp=safe  " in proc.stderr.split("Fix it on the command line:")[1]


@pytest.mark.slow
def test_user_model_with_a_changing_graph_trains_with_safe(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=alternate", "ddp=safe")
    assert proc.returncode == 0, output(proc)


@pytest.mark.slow
def test_a_dead_rank_is_named_first(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=none", "+framework.model.fail_on_rank=1",
                 "+framework.model.fail_at_step=3", timeout=120)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert proc.stderr.startswith("error: rank 1 failed: the process died with exit code 17 before reporting")
    assert "(rank 0 then lost the connection to it: a consequence, not a cause.)" in proc.stderr


@pytest.mark.slow
def test_a_failed_rank_never_leaves_a_stuck_one_hanging(workdir):
    # rank 0 raises; rank 1 is stuck where no collective would ever time out: the launcher stops it.
    proc = train(workdir, *USER, "+framework.model.unused=none", "+framework.model.fail_on_rank=0",
                 "+framework.model.fail_how=raise", "+framework.model.hang_on_rank=1",
                 "+framework.model.fail_at_step=3", "launcher.grace_s=1", timeout=120)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "rank 0 failed: ValueError: boom on rank 0" in proc.stderr
    assert "rank 1 had not reported 1 s after the first failure (launcher.grace_s) and was stopped" in proc.stderr


def test_unknown_constructor_argument_names_the_key(workdir):
    proc = train(workdir, *USER, "+framework.model.hiden=8")
    assert proc.returncode == 2
    assert "framework.model.hiden: my_pkg.TrickyNet takes no argument 'hiden'" in proc.stderr
    assert run_dirs(workdir) == []
