"""The DDP error translator on its own: parsing, grouping, and the message's wording."""

from __future__ import annotations

from adapters.diagnose import Diagnosis, diagnose, format_failure, unused_indices

TORCH_TEXT = (
    "Expected to have finished reduction in the prior iteration before starting a new one. [...]\n"
    "Parameter indices which did not receive grad for rank 1: 2 3 7\n"
    " In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL"
)


def test_indices_are_parsed_per_rank():
    assert unused_indices(TORCH_TEXT) == {1: [2, 3, 7]}


def test_without_the_model_the_indices_are_still_reported():
    d = diagnose(RuntimeError(TORCH_TEXT), rank=1)
    assert d.kind == "unused_parameters" and d.unused == ["<parameter index 2>", "<parameter index 3>",
                                                         "<parameter index 7>"]  # fmt: skip


def test_names_from_the_model():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2),
                                torch.nn.Linear(2, 2))  # fmt: skip
    d = diagnose(RuntimeError(TORCH_TEXT), rank=1, ddp_model=model)
    assert d.unused == ["1.weight", "1.bias", "3.bias"]


def test_rank_sets_that_differ_are_flagged():
    a = Diagnosis(0, "unused_parameters", "2 parameters got no gradient", TORCH_TEXT, ["aux.w", "aux.b"])
    b = Diagnosis(1, "unused_parameters", "1 parameters got no gradient", TORCH_TEXT, ["aux.w"])
    text = format_failure([b, a])
    assert text.startswith("DDP stopped on ranks 0, 1")
    assert "aux (some ranks): aux.w, aux.b" in text
    assert "The unused set differs between ranks" in text


def test_root_cause_before_consequence():
    dead = Diagnosis(1, "error", "the process died with signal SIGKILL before reporting", "")
    lost = diagnose(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1152"), rank=0)
    assert lost.kind == "peer_lost"
    text = format_failure([lost, dead])
    assert text.startswith("rank 1 failed: the process died with signal SIGKILL")
    assert "(rank 0 then lost the connection to it: a consequence, not a cause.)" in text
    assert "The original error" not in text, "a process killed outright left no error to show"


def test_ready_twice_points_at_checkpointing():
    d = diagnose(RuntimeError("Expected to mark a variable ready only once. ..."), rank=0)
    assert d.kind == "ready_twice"
    assert "use_reentrant=False" in format_failure([d])
