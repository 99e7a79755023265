"""The unused-parameter decision as a table: policy x what the first training steps showed.

``unused.decide`` and ``observe.Observation`` are pure, so every row runs in microseconds, without processes; the
real runs in the framework tests show the same decisions taking effect in DDP's own wrapper.
"""

from __future__ import annotations

import pytest

from adapters.errors import ConfigError
from adapters.observe import Observation
from adapters.policy import DDPPolicy, UnusedParams
from adapters.unused import Decision, decide, needs_observation

PARAMS = ["a.w", "b.w", "c.w"]


def seen(*per_step: list[str], ranks: int = 2, reentrant: bool = False) -> Observation:
    """What every rank saw: the parameters without a gradient in each step (the same on every rank)."""
    unused = {r: [list(s) for s in per_step] for r in range(ranks)}
    return Observation(len(per_step), ranks, 0.1, PARAMS, unused, reentrant=reentrant)


ALL_USED = seen([], [])
C_NEVER = seen(["c.w"], ["c.w"])
C_SOMETIMES = seen(["c.w"], [])
UNEVEN = Observation(2, 2, 0.1, PARAMS, {0: [["c.w"], ["c.w"]], 1: [[], []]})  # unused on rank 0 only
C_SOMETIMES_REENTRANT = seen(["c.w"], ["b.w", "c.w"], reentrant=True)

IGNORE = UnusedParams.ignore
STRICT, FIND = UnusedParams.strict, UnusedParams.find


def policy(choice: UnusedParams, ignore: tuple[str, ...] = ()) -> DDPPolicy:
    return DDPPolicy(unused_params=choice, ignore=list(ignore))


# (policy, what the first steps showed) -> (how the reducer is built, parameters left out of DDP)
TABLE = [
    # auto: the cheapest setting that holds
    (policy(UnusedParams.auto), ALL_USED, STRICT, ()),
    (policy(UnusedParams.auto), C_NEVER, IGNORE, ("c.w",)),
    (policy(UnusedParams.auto), C_SOMETIMES, FIND, ()),
    (policy(UnusedParams.auto), UNEVEN, FIND, ()),
    # reentrant checkpointing: find_unused_parameters fails with it; every sometimes-unused one is left out, guarded
    (policy(UnusedParams.auto), C_SOMETIMES_REENTRANT, IGNORE, ("b.w", "c.w")),
    (policy(UnusedParams.auto), seen(["c.w"], ["c.w"], reentrant=True), IGNORE, ("c.w",)),
    # ignore without names: the never-used parameters
    (policy(IGNORE), C_NEVER, IGNORE, ("c.w",)),
    (policy(IGNORE), ALL_USED, IGNORE, ()),
]


@pytest.mark.parametrize("pol, observation, choice, left_out", TABLE)
def test_decide(pol, observation, choice, left_out):
    decision = decide(pol, observation)
    assert (decision.choice, decision.leave_out) == (choice, left_out)
    if left_out:
        assert decision.why and decision.advice, "the guard's message needs both"


def test_ignore_refuses_parameters_unused_only_sometimes():
    for observation in (C_SOMETIMES, UNEVEN):
        with pytest.raises(ConfigError, match=r"ddp=ignore: in the first 2 training steps some parameters were unused"):
            decide(policy(IGNORE), observation)


def test_auto_logs_its_choice_and_reason():
    decision = decide(policy(UnusedParams.auto), C_SOMETIMES)
    assert decision.log[0].startswith("ddp=auto chose find: the parameters without a gradient changed")
    assert any("c.w" in line for line in decision.log[1:])


def test_which_policies_decide_from_the_first_steps():
    assert needs_observation(policy(UnusedParams.auto)) and needs_observation(policy(IGNORE))
    assert not needs_observation(policy(IGNORE, ("c.w",)))
    assert not any(needs_observation(policy(c)) for c in (UnusedParams.strict, UnusedParams.find,
                                                          UnusedParams.static))  # fmt: skip


def test_the_default_decision_changes_nothing():
    assert Decision().choice is STRICT and Decision().leave_out == ()


def test_the_report_recommends_what_auto_picks():
    assert "Recommended: ddp=ignore (or ddp=static)" in C_NEVER.report()
    assert "Recommended: ddp=safe" in C_SOMETIMES.report()
    assert "Recommended: ddp=strict" in ALL_USED.report()
    assert "reentrant activation checkpointing" in C_SOMETIMES_REENTRANT.report()
