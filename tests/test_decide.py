"""The unused-parameter decision as a table: policy x what the probe saw x what the framework allows.

``unused.decide`` is pure, so every row runs in microseconds, without processes; the real runs in the
framework tests show the same decisions taking effect in DDP's own wrapper.
"""

from __future__ import annotations

import pytest

from adapters.errors import ConfigError
from adapters.policy import DDPPolicy, UnusedParams
from adapters.probe import ProbeResult
from adapters.unused import Capabilities, Decision, decide, needs_probe

PARAMS = ["a.w", "b.w", "c.w"]


def probe(*per_step: list[str], ranks: int = 2) -> ProbeResult:
    """What every rank saw: the parameters without a gradient in each step (the same on every rank)."""
    unused = {r: [list(s) for s in per_step] for r in range(ranks)}
    return ProbeResult(len(per_step), ranks, 0.1, 0.05, PARAMS, unused)


ALL_USED = probe([], [])
C_NEVER = probe(["c.w"], ["c.w"])
C_SOMETIMES = probe(["c.w"], [])
UNEVEN = ProbeResult(2, 2, 0.1, 0.05, PARAMS, {0: [["c.w"], ["c.w"]], 1: [[], []]})  # unused on rank 0 only

IGNORE = UnusedParams.ignore
YES, NO = Capabilities(can_ignore=True), Capabilities(can_ignore=False)


def policy(choice: UnusedParams, ignore: tuple[str, ...] = ()) -> DDPPolicy:
    return DDPPolicy(unused_params=choice, ignore=list(ignore))


# (policy, probe result, capabilities) -> (DDP arguments added, parameters left out, given as patterns)
TABLE = [
    # fixed by translate: nothing decided in the run, whatever the probe saw
    (policy(UnusedParams.strict), None, YES, None, (), False),
    (policy(UnusedParams.find), None, YES, None, (), False),
    (policy(UnusedParams.static), None, YES, None, (), False),
    # auto: the cheapest setting that works
    (policy(UnusedParams.auto), ALL_USED, YES, None, (), False),
    (policy(UnusedParams.auto), C_NEVER, YES, {}, ("c.w",), False),
    (policy(UnusedParams.auto), C_SOMETIMES, YES, {"find_unused_parameters": True}, (), False),
    (policy(UnusedParams.auto), UNEVEN, YES, {"find_unused_parameters": True}, (), False),
    # auto where the framework wraps a module of its own: ignore becomes static_graph
    (policy(UnusedParams.auto), C_NEVER, NO, {"static_graph": True}, (), False),
    (policy(UnusedParams.auto), C_SOMETIMES, NO, {"find_unused_parameters": True}, (), False),
    (policy(UnusedParams.auto), ALL_USED, NO, None, (), False),
    # ignore without names: the probe's never-used parameters
    (policy(IGNORE), C_NEVER, YES, {}, ("c.w",), False),
    (policy(IGNORE), ALL_USED, YES, {}, (), False),
    (policy(IGNORE), C_NEVER, NO, {"static_graph": True}, (), False),
    # ignore with names: the names, matched against the module by the engine
    (policy(IGNORE, ("c.*",)), None, YES, {}, ("c.*",), True),
    (policy(IGNORE, ("c.*",)), None, NO, {"static_graph": True}, (), False),
]


@pytest.mark.parametrize("pol, seen, caps, kwargs, left_out, patterns", TABLE)
def test_decide(pol, seen, caps, kwargs, left_out, patterns):
    decision = decide(pol, seen, caps)
    assert (decision.ddp_kwargs, decision.leave_out, decision.patterns) == (kwargs, left_out, patterns)
    if left_out:
        assert decision.why and decision.advice, "the guard's message needs both"


def test_ignore_refuses_parameters_unused_only_sometimes():
    for seen in (C_SOMETIMES, UNEVEN):
        with pytest.raises(ConfigError, match=r"ddp=ignore: the probe found parameters unused only in some steps"):
            decide(policy(IGNORE), seen)


def test_auto_logs_its_choice_and_reason():
    decision = decide(policy(UnusedParams.auto), C_SOMETIMES)
    assert decision.log[0].startswith("ddp=auto chose find: the parameters without a gradient changed")
    assert any("c.w" in line for line in decision.log[1:])


def test_which_policies_need_a_probe():
    assert needs_probe(policy(UnusedParams.auto)) and needs_probe(policy(IGNORE))
    assert not needs_probe(policy(IGNORE, ("c.w",)))
    assert not any(needs_probe(policy(c)) for c in (UnusedParams.strict, UnusedParams.find, UnusedParams.static))


def test_the_default_decision_changes_nothing():
    assert Decision().ddp_kwargs is None and Decision().leave_out == ()
