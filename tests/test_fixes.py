"""Every fix a failure message offers trains when followed: each failure the suite can produce, on framework=torch
(real DDP, 2 processes, gloo), is run; the fixes its message offers are read back from what the user sees and each
one is run on the same model; each must train (exit 0, replicas equal). The advice itself is a pure function
(``adapters.advice``): its rules hold for generated facts too.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.advice import Facts, fixes

from conftest import assert_every_fix_trains, output, train

MODEL = ["framework.model._target_=my_pkg.TrickyNet", "framework.data._target_=my_pkg.Regression",
         "framework.steps=6", "framework.log_every=3"]  # fmt: skip
# A fix given as code, and the same change made to the test model.
CODE_FIXES = {"use_reentrant=False": ["+framework.model.checkpoint=plain"]}


CASES = {
    # the unused set changes between steps: strict stops at step 2
    "strict, a changing set": (["+framework.model.unused=alternate"], ["ddp=strict"], "got no gradient"),
    # the set differs between ranks: strict stops at step 1
    "strict, a set that differs between ranks": (
        ["+framework.model.unused=some_ranks"],
        ["ddp=strict"],
        "got no gradient",
    ),  # fmt: skip
    # static_graph with a graph that changes after the first step
    "static, a changing graph": (["+framework.model.unused=alternate"], ["ddp=static"], "static_graph=True"),
    # reentrant activation checkpointing: find_unused_parameters marks parameters ready twice
    "safe, reentrant checkpointing": (
        ["+framework.model.unused=alternate", "+framework.model.checkpoint=reentrant"],
        ["ddp=safe"],
        "reentrant",
    ),  # fmt: skip
    "strict, reentrant checkpointing": (
        ["+framework.model.unused=alternate", "+framework.model.checkpoint=reentrant"],
        ["ddp=strict"],
        "got no gradient",
    ),  # fmt: skip
    # auto's first steps used everything; a later step does not
    "auto chose strict, a later miss": (
        ["+framework.model.unused=until", "+framework.model.late_from=4"],
        [],
        [
            "ddp=auto decided this from the first 2 training step(s): it saw every parameter used in every step, and "
            "chose strict. The parameters above got no gradient in training step 4",
            "  ddp.probe_steps=4  ",
        ],
    ),  # fmt: skip
    # a parameter left out of DDP gets a gradient, and the run was told to stop then: before the optimizer step
    "a left-out parameter used, on_ignored_grad=fail": (
        ["+framework.model.unused=late", "+framework.model.late_from=3"],
        ["ddp.on_ignored_grad=fail"],
        [
            "5 parameter(s) left out of DDP got a gradient in training step 3, on 2 of 2 ranks",
            "The run stops before the optimizer step",
            "  aux.proj: aux.proj.weight, aux.proj.bias",
        ],
    ),  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_fix_a_message_offers_trains(workdir, case):
    model, setting, words = CASES[case]
    proc = train(workdir / "failing", *MODEL, *model, *setting)
    assert proc.returncode == 1, output(proc)
    assert "Traceback" not in proc.stderr
    for said in [words] if isinstance(words, str) else words:
        assert said in proc.stderr, proc.stderr
    found = assert_every_fix_trains(workdir, proc, MODEL, model, code_fixes=CODE_FIXES)
    failed = {o for o in setting if o.startswith("ddp=")} or {"ddp=auto"}
    assert not any(set(fix) & failed and len(fix) == 1 for fix in found), "offers the setting that just failed"


@pytest.mark.slow
def test_a_parameter_unfrozen_after_ddp_was_built_is_reduced_from_then_on(workdir):
    # The stem is frozen when DDP builds its reducer and trainable from step 3: without a rebuild DDP would never
    # reduce it and the replicas would drift apart; the run names the cause and stays right.
    proc = train(workdir, *MODEL, "+framework.model.unused=none", "+framework.model.unfreeze_at=3", "ddp=strict")
    assert proc.returncode == 0, output(proc)  # and run() found every rank's parameters equal
    said = proc.stdout
    assert "2 parameter(s) were frozen (requires_grad=False) when DDP built its reducer and are trainable now, at " \
           "training step 3" in said and "  stem: stem.weight, stem.bias" in said  # fmt: skip


# --- the rules, for generated facts -----------------------------------------------------------------

FACTS = st.builds(
    Facts,
    kind=st.sampled_from(["unused_parameters", "graph_changed", "ready_twice", "ignored_got_grad"]),
    preset=st.sampled_from(["strict", "find", "static", "ignore", "auto"]),
    probe_steps=st.integers(1, 6), step=st.integers(0, 9),
    unused=st.lists(st.sampled_from(["a.w", "b.w", "c.bias"]), unique=True),
    ranks_differ=st.booleans(), changed=st.sampled_from([None, True, False]), accumulation=st.booleans(),
    reentrant=st.booleans(), manual_optimization=st.booleans(), chosen=st.sampled_from(["", "strict", "ignore",
                                                                                        "find"]),
    observed_steps=st.integers(0, 6),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(FACTS)
def test_no_fix_is_one_the_facts_rule_out(f):
    offered_ = [x.override for x in fixes(f)]
    words = " ".join(offered_)
    if f.reentrant:
        assert "ddp=safe" not in offered_, "find_unused_parameters fails with reentrant checkpointing"
    if f.changed or f.ranks_differ or f.manual_optimization or f.changed is None or f.kind == "graph_changed":
        assert "ddp=static" not in offered_, "static needs the same set in every step, seen"
    if f.kind == "unused_parameters" and f.step > 1:
        assert "ddp=static" not in offered_, "a failure after step 1 means the set changed"
    if f.manual_optimization:
        assert "ddp=ignore" not in words, "each optimizer's backward leaves the other's parameters unused"
    just_failed = {"strict": "ddp=strict", "find": "ddp=safe", "static": "ddp=static", "auto": "ddp=auto"}
    if f.preset in just_failed:
        assert just_failed[f.preset] not in offered_, "never the setting that just failed"
    if f.preset == "auto" and f.chosen == "find":
        assert "ddp=safe" not in offered_, "auto chose find: safe is what just failed"
