"""A built DDP wrapper changed in place, and the observer of the first steps, in one process (a group of one rank).

The multi-process behaviour (the decision, bit-equal weights against the chosen setting set by hand) is tested
with real runs in test_auto.py and each framework's file; these cases need one process and run in a second.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adapters.launch import free_port
from adapters.policy import Backend, DDPPolicy, UnusedParams
from adapters.reducer import CannotRebuild, rebuild, reducer_names
from adapters.unused import Engine


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Heads(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.aux = nn.Linear(4, 1)
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise MemoryError("out of memory (a test's)")
        return self.head(torch.tanh(self.body(x))).sum()


def test_rebuild_changes_the_reducer_of_the_same_wrapper_and_keeps_its_hooks(one_rank_group):
    ddp = DistributedDataParallel(Heads())
    calls = []

    def hook(state, bucket):  # a framework's own communication hook, registered after the wrapper was built
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        calls.append(1)
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    old = ddp.reducer
    rebuild(ddp, ignore=["aux.weight", "aux.bias"])
    assert ddp.reducer is not old and "aux.weight" not in reducer_names(ddp)
    assert ddp.module.aux.weight.grad is None
    ddp(torch.randn(2, 4)).backward()  # strict: aux, left out, is not waited for
    ddp._check_reducer_finalized()
    assert calls and ddp.module.aux.weight.grad is None, "the hook reduced the rebuilt reducer's bucket"
    rebuild(ddp, find=True)
    assert ddp.find_unused_parameters and ddp.reducer is not None
    with pytest.raises(CannotRebuild, match="not a DistributedDataParallel"):
        rebuild(nn.Linear(2, 2))


def test_a_forward_that_raises_while_the_first_steps_are_observed_leaves_ddps_flags_as_they_were(one_rank_group):
    model = Heads()
    ddp = DistributedDataParallel(model)
    engine = Engine(DDPPolicy(unused_params=UnusedParams.auto), 0, 1, Backend.gloo, logging.getLogger("test"))
    engine.track(ddp)
    model.fail = True
    with pytest.raises(MemoryError):
        ddp(torch.randn(2, 4))  # dropped by the loop, as memory.on_oom=halve drops a step
    assert ddp.require_backward_grad_sync is True, "the framework's flag, not the observer's"
    model.fail = False
    for _ in range(3):
        ddp(torch.randn(2, 4)).backward()
    assert engine.decision is not None and engine.decision.choice is UnusedParams.ignore
    assert engine.decision.leave_out == ("aux.weight", "aux.bias") and "aux.weight" in ddp.parameters_to_ignore
    engine.release()


class Delayed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(self.a(x)).sum()


def test_a_wrapper_whose_reducer_cannot_be_rebuilt_is_averaged_by_the_engine_for_the_whole_run(one_rank_group):
    # DDP's delay_all_reduce_named_params keeps state a rebuilt reducer would lose: auto's decision (ignore aux)
    # cannot be applied, and a strict reducer would stop at the first step that leaves aux unused.
    model = Delayed()
    ddp = DistributedDataParallel(model, delay_all_reduce_named_params=[("a.weight", model.a.weight)],
                                  param_to_hook_all_reduce=model.b.weight)  # fmt: skip
    engine = Engine(DDPPolicy(unused_params=UnusedParams.auto), 0, 1, Backend.gloo, logging.getLogger("test"))
    engine.track(ddp)
    for _ in range(5):
        ddp(torch.randn(2, 4)).backward()
    assert engine.decision.choice is UnusedParams.ignore and engine.observer is not None and engine.observer.forever
    assert model.aux.weight.grad is None and model.b.weight.grad is not None
    engine.release()
