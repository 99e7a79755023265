"""Never wrong in silence: parameters left out of DDP stay in sync, and the replicas are compared.

End to end with framework=torch (real DDP, 2 processes, gloo): a branch ddp=auto's observed first steps never
saw run, by a step counter and by a seeded random skip; a tied parameter left out; a used parameter named in
ddp.ignore; a model that changes its own weights on one rank; a later miss after auto chose strict. Then the
guard alone, with real DDP in two processes: its gradients equal DDP's own averaging with gradient accumulation, a
GradScaler and gradient clipping, and ddp.on_ignored_grad=fail stops before the optimizer step.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adapters.launch import free_port

from conftest import output, replica_digests, run, run_dirs, train
from my_pkg import TrickyNet, random_use_seed

USER = ["framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
        "framework.steps=8", "framework.log_every=4"]  # fmt: skip
AUX = ["aux.proj.weight", "aux.proj.bias", "aux.out.weight", "aux.out.bias", "aux_tied.bias"]


def initial_digests() -> dict[str, str]:
    """The digests of TrickyNet's parameters as the torch adapter builds it (seed 0), before training."""
    import hashlib

    torch.manual_seed(0)
    model = TrickyNet()
    return {n: hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}  # fmt: skip


def only_run_dir(workdir):
    [run_dir] = run_dirs(workdir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["step counter", "seeded random skip"])
def test_a_branch_the_first_steps_missed_is_synchronised_and_the_replicas_stay_equal(workdir, branch):
    if branch == "step counter":  # steps 1-2 decide; the branch runs from training step 5 on
        model = ["+framework.model.unused=late", "+framework.model.late_from=5"]
    else:  # LayerDrop-like: skipped in both observed steps on both ranks, used later on some rank
        model = ["+framework.model.unused=random", "+framework.model.use_p=0.25",
                 f"+framework.model.seed={random_use_seed(0.25)}"]  # fmt: skip
    proc = train(workdir, *USER, *model)  # ddp=auto, the default
    assert proc.returncode == 0, output(proc)  # run() compared every rank's parameter digests too
    assert "ddp=auto chose ignore" in proc.stdout
    digests = replica_digests(only_run_dir(workdir))
    before = initial_digests()
    assert all(digests[0][n] != before[n] for n in AUX), "the branch trained: its parameters moved"
    warning = proc.stdout.split("left out of DDP got a gradient in training step ")[1]
    if branch == "step counter":
        assert warning.startswith("5, on 2 of 2 ranks")
    assert "aux.proj: aux.proj.weight, aux.proj.bias" in warning and "ddp=safe" in warning
    assert "ddp.probe_steps" in warning


@pytest.mark.slow
def test_a_tied_parameter_left_out_under_every_name_trains(workdir):
    # aux_tied.weight is aux.out.weight: DDP looks it up under both names; listing one would stop the run.
    proc = train(workdir, *USER, "+framework.model.unused=aux")
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore" in proc.stdout
    log = (only_run_dir(workdir) / "rank1.log").read_text()
    assert "DDP as built: find_unused_parameters=False, static_graph=False" in log and "ignored=6" in log
    assert "left out of DDP got a gradient" not in proc.stdout


@pytest.mark.slow
def test_a_used_parameter_named_in_ignore_is_kept_in_sync(workdir):
    # heads.2 is the demo's full-resolution head: used in every step.
    proc = train(workdir, "ddp=ignore", "ddp.ignore=[heads.2]", "framework.steps=6", "framework.log_every=3")
    assert proc.returncode == 0, output(proc)
    assert "2 parameter(s) left out of DDP got a gradient in training step 1, on 2 of 2 ranks (they are named in " \
           "ddp.ignore)" in proc.stdout  # fmt: skip
    assert "heads.2: heads.2.weight, heads.2.bias" in proc.stdout
    assert proc.stdout.count("left out of DDP got a gradient") == 1, "said once"


@pytest.mark.slow
def test_replicas_that_differ_fail_the_run_naming_the_module(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=none", "+framework.model.perturb_on_rank=1",
                 "+framework.model.perturb_at=4")  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "The replicas differ at the end of the run: the parameters of rank(s) 1 are not rank 0's" in proc.stderr
    assert "  head: head.weight\n" in proc.stderr
    digests = replica_digests(only_run_dir(workdir))
    assert [n for n in digests[0] if digests[0][n] != digests[1][n]] == ["head.weight"], "independently: they do"


@pytest.mark.slow
def test_replicas_are_checked_every_n_steps_when_asked(workdir):
    proc = train(workdir, *USER, "+framework.model.unused=none", "+framework.model.perturb_on_rank=1",
                 "+framework.model.perturb_at=5", "ddp.check_replicas_every=2")  # fmt: skip
    assert proc.returncode == 1, output(proc)
    # forward 5 is training step 5: the step-6 check sees it, before the run ends
    assert "The replicas differ after optimizer step 6" in proc.stderr


@pytest.mark.slow
def test_doctor_recommends_a_wrapper_that_works_for_a_tied_parameter(workdir):
    proc = run([sys.executable, "-m", "adapters", "doctor", *USER, "+framework.model.unused=aux"], workdir)
    assert proc.returncode == 0, output(proc)
    assert "Recommended: ddp=ignore" in proc.stdout
    assert "A branch used later" in proc.stdout, "says what the first steps cannot show"
    # and what it recommends, built: ddp=ignore from the first steps trains (exit 0, replicas equal)
    proc = train(workdir, *USER, "+framework.model.unused=aux", "ddp=ignore")
    assert proc.returncode == 0, output(proc)


CONTRACT = [
    (["framework.data._target_=my_pkg.PairData"], "the items of my_pkg.PairData are tuples, not dicts"),
    (["framework.model._target_=my_pkg.TupleOutput"], "framework.model returned a tuple of 2, not the loss"),
    (["framework.model._target_=my_pkg.Logits"], "returned a tensor of shape [2, 3], not a loss with one value"),
    (["framework.data._target_=adapters.demo.SyntheticBlobs"], "forward cannot take the dataset's keys"),
]


@pytest.mark.parametrize("overrides,words", CONTRACT)
def test_a_model_or_dataset_that_breaks_the_contract_is_refused_before_anything_runs(workdir, overrides, words):
    base = {"framework.model._target_": "my_pkg.TrickyNet", "framework.data._target_": "my_pkg.Regression"}
    base.update(o.split("=", 1) for o in overrides)
    proc = train(workdir, *(f"{k}={v}" for k, v in base.items()))
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr and "The contract: the dataset's items are dicts of tensors" in proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == [], "refused before any folder is written"


# --- the guard alone, on real DDP in two processes ---------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)
        self.aux = nn.Linear(6, 1)

    def forward(self, x, use_aux: bool):
        h = torch.tanh(self.body(x))
        out = self.head(h).pow(2).mean()
        return out + self.aux(h).pow(2).mean() if use_aux else out


def _train(rank: int, ddp_kwargs: dict, guarded: bool, scaler: bool, on_grad: str = "sync",
           exchange: str | None = None) -> dict:  # fmt: skip
    """6 optimizer steps of 2 micro-batches each (the first under no_sync), clipping, optionally a GradScaler;
    aux is used on rank 1 only, in some micro-batches."""
    from adapters.guard import IgnoredGradGuard, StepCounter
    from adapters.ignorelist import set_ignored
    from adapters.policy import OnIgnoredGrad

    torch.manual_seed(0)
    model = Branchy()
    if guarded:
        set_ignored(model, ["aux.weight", "aux.bias"])
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    if guarded:
        import logging

        IgnoredGradGuard(ddp, ["aux.weight", "aux.bias"], StepCounter(ddp), on_grad=OnIgnoredGrad[on_grad],
                         why="test", advice="test", log=logging.getLogger("test"), exchange=exchange)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    g = torch.Generator().manual_seed(rank)
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        for micro in range(2):
            x = torch.randn(4, 6, generator=g)
            use_aux = rank == 1 and (step + micro) % 3 == 1
            context = ddp.no_sync() if micro == 0 else torch.enable_grad()
            with context:
                loss = ddp(x, use_aux)
                (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        if grad_scaler:
            grad_scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if grad_scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            opt.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # plain arrays cross processes


def _tear_down(ok: bool) -> None:
    """As the launcher's ranks end: the group gone while the interpreter is whole, then os._exit. Gloo's threads
    hold a finished collective's work (and its tensors) for a moment after it completes; a tensor they free
    during the interpreter's own shutdown needs the GIL, and taking it then aborts the process after a test
    that passed (seen once in about fifty such processes). A failed rank raises on instead, without waiting
    for its peer."""
    import gc
    import time

    gc.collect()
    if not ok:
        return
    dist.barrier()
    time.sleep(0.05)  # without the GIL: gloo's threads let go of what they hold
    dist.destroy_process_group()
    os._exit(0)


def _worker(rank: int, port: int, scaler: bool, exchange: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ok = False
    try:
        reference = _train(rank, {"find_unused_parameters": True}, guarded=False, scaler=scaler)
        guarded = _train(rank, {}, guarded=True, scaler=scaler, exchange=exchange)
        failed = None
        try:
            _train(rank, {}, guarded=True, scaler=scaler, on_grad="fail", exchange=exchange)
        except RuntimeError as exc:
            failed = str(exc)
        results.put((rank, reference, guarded, failed))
        ok = True
    finally:
        _tear_down(ok)


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["piggyback", "collective"])
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "GradScaler"])
def test_guard_averages_like_ddp_with_accumulation_and_clipping(scaler, exchange):
    # piggyback: the flags ride on DDP's last bucket (gloo's way); collective: one all-reduce (nccl's way).
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(free_port("127.0.0.1"), scaler, exchange, results), nprocs=2,
                       start_method="spawn")  # fmt: skip
    got = {}
    for _ in range(2):
        rank, reference, guarded, failed = results.get()
        got[rank] = (reference, guarded, failed)
    for name in got[0][0]:
        assert (got[0][1][name] == got[1][1][name]).all(), f"guarded replicas differ in {name}"
        assert abs(got[0][1][name] - got[0][0][name]).max() < 1e-6, f"guard is not DDP's average: {name}"
    torch.manual_seed(0)
    assert not (got[0][1]["aux.weight"] == Branchy().aux.weight.detach().numpy()).all(), "aux trained everywhere"
    for rank in (0, 1):
        assert "left out of DDP got a gradient in training step 1" in got[rank][2], "fail stops on every rank"


class RootScaled(nn.Module):
    """A parameter on the root module (as CLIP's logit_scale), a head, and state the model keeps per rank."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.per_rank = nn.Parameter(torch.zeros(2))  # the model's own code leaves it out of DDP on purpose
        self._ddp_params_and_buffers_to_ignore = ["per_rank"]

    def forward(self, x, use_head: bool = False):
        out = self.body(x).sum()
        return out + self.head(x).sum() if use_head else out


def _edge_worker(rank: int, port: int, results) -> None:
    import gc
    import logging
    import weakref

    from adapters import replicas
    from adapters.guard import IgnoredGradGuard, StepCounter
    from adapters.ignorelist import set_ignored
    from adapters.policy import OnIgnoredGrad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out, ok = {}, False
    try:
        log = logging.getLogger("test")
        # A replaced wrapper is freed at once (no reference cycle through the guard), so its reducer's hooks
        # can never fire in a later backward.
        torch.manual_seed(0)
        model = RootScaled()
        added = set_ignored(model, ["scale", "head.weight", "head.bias"])
        ddp = DistributedDataParallel(model)
        counter = StepCounter(ddp)
        guard = IgnoredGradGuard(ddp, ["scale", "head.weight", "head.bias"], counter, on_grad=OnIgnoredGrad.sync,
                                 why="test", advice="test", log=log)  # fmt: skip
        out["exchange"] = guard.exchange
        ddp(torch.randn(2, 4)).backward()
        guard.remove()
        counter.remove()
        old = weakref.ref(ddp)
        del ddp, guard, counter
        out["freed without gc"] = old() is None
        gc.collect()
        # The replica check compares the root parameter this run left out, and skips the model's own.
        with torch.no_grad():
            if rank == 1:
                model.scale.add_(1.0)
                model.per_rank.add_(1.0)
        report = replicas.compare(model, left_out_by_us=added)
        out["differ"], out["skipped"] = sorted(report.params_differ), report.skipped
        # With a static graph DDP reduces buckets its own way: the guard exchanges its flags on its own.
        torch.manual_seed(0)
        model = RootScaled()
        set_ignored(model, ["head.weight", "head.bias"])
        ddp = DistributedDataParallel(model, static_graph=True)
        guard = IgnoredGradGuard(ddp, ["head.weight", "head.bias"], StepCounter(ddp), on_grad=OnIgnoredGrad.sync,
                                 why="test", advice="test", log=log)  # fmt: skip
        for step in range(3):
            ddp(torch.randn(2, 4), use_head=step == 2 and rank == 0).backward()
        out["static exchange"], out["static synced"] = guard.exchange, guard.synced_steps
        out["static head grads equal"] = model.head.weight.grad.numpy().copy()
        results.put((rank, out))
        ok = True
    finally:
        _tear_down(ok)


@pytest.mark.slow
def test_guard_frees_a_replaced_wrapper_checks_root_parameters_and_handles_a_static_graph():
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_edge_worker, args=(free_port("127.0.0.1"), results), nprocs=2, start_method="spawn")
    got = dict(results.get() for _ in range(2))
    for rank in (0, 1):
        out = got[rank]
        assert out["exchange"] == "piggyback" and out["freed without gc"]
        assert out["differ"] == ["scale"] and out["skipped"] == ["per_rank"]
        assert out["static exchange"] == "collective" and out["static synced"] == [3]
    assert (got[0]["static head grads equal"] == got[1]["static head grads equal"]).all()
