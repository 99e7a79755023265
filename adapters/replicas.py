"""The replica check: at the end of a run (and every ``ddp.check_replicas_every`` steps) every rank's
parameters are compared with rank 0's, bit for bit.

DDP keeps replicas equal by construction, as long as every gradient that is applied was reduced. A
parameter left out of DDP and updated on some ranks only, a rank that skipped a step on its own, a model
that changes its own weights per rank: each makes the replicas drift apart with nothing said, and the run
still exits 0 with rank 0's weights saved. This check makes that loud: it names the modules that differ
and the run exits non-zero.

How: each rank computes, on its own device, one 64-bit fingerprint per tensor (its bytes as 32-bit words,
each multiplied by an odd weight that depends on its position, summed modulo 2**64: any single changed word
changes it, and swapped values do too), and the ranks gather the fingerprints: one small collective.

What is compared: every parameter (trainable or frozen) and every buffer, except what the model itself asks
DDP to leave alone (``_ddp_params_and_buffers_to_ignore`` set by the model's own code: state kept per rank
on purpose). Buffers are reported, not failed: DDP itself keeps them per rank between its broadcasts
(``broadcast_buffers`` copies rank 0's at the start of each forward, so the last forward's BatchNorm
statistics always differ; mmengine does not broadcast them at all), and rank 0's are the ones saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .diagnose import group_by_module

_CHUNK = 1 << 22  # words per step of the fingerprint: its temporaries stay near 128 MiB
_MIX = 0x9E3779B1  # an odd constant (2**32 / golden ratio), for position weights


class ReplicasDiffer(RuntimeError):
    """Raised on every rank when the parameters differ between ranks."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


@dataclass
class ReplicaReport:
    compared: int  # tensors compared
    params_differ: dict[str, list[int]] = field(default_factory=dict)  # name -> ranks that differ from rank 0
    buffers_differ: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # the model's own per-rank state

    @property
    def equal(self) -> bool:
        return not self.params_differ


def fingerprint(tensor: Any) -> Any:
    """A 64-bit fingerprint of ``tensor``'s bytes, computed on its own device (a 0-dim int64 tensor)."""
    import torch

    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.contiguous().view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=tensor.device)
        weights = (position * _MIX) % 0x7FFFFFFF * 2 + 1  # odd, below 2**32: products stay below 2**63
        total += (chunk * weights).sum()
    return total + words.numel()


def _own_ignore_list(module: Any, ours: Iterable[str]) -> set[str]:
    """Names the model's own code asked DDP to ignore (not the ones this project added)."""
    return set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) - set(ours)


def compare(module: Any, *, left_out_by_us: Iterable[str] = (), group: Any = None) -> ReplicaReport:
    """Compare ``module``'s parameters and buffers across ranks (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    own = _own_ignore_list(module, left_out_by_us)
    entries = [(n, t, "param") for n, t in module.named_parameters()] + [
        (n, t, "buffer") for n, t in module.named_buffers()
    ]
    skipped = [n for n, _, _ in entries if n in own or f".{n}" in own]
    entries = [e for e in entries if e[0] not in skipped]
    # The collective's device: the CPU for gloo, this rank's GPU for nccl (whatever device each tensor is on).
    device = torch.device("cpu")
    if dist.get_backend(group) != "gloo" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    mine = (
        torch.stack([fingerprint(t).to(device) for _, t, _ in entries])
        if entries
        else torch.zeros(0, dtype=torch.int64)
    )
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(entries)], dtype=torch.int64, device=device), group=group)
    if len({int(s) for s in sizes}) > 1:
        counts = ", ".join(f"rank {r}: {int(s)}" for r, s in enumerate(sizes))
        raise ReplicasDiffer(f"The ranks hold different numbers of parameters and buffers ({counts}).", [])
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.to(device), group=group)
    report = ReplicaReport(compared=len(entries), skipped=skipped)
    reference = gathered[0].cpu()
    for rank in range(1, world):
        differ = (gathered[rank].cpu() != reference).nonzero().flatten().tolist()
        for index in differ:
            name, _, kind = entries[index]
            target = report.params_differ if kind == "param" else report.buffers_differ
            target.setdefault(name, []).append(rank)
    return report


def failure_message(report: ReplicaReport, when: str, frozen_since_build: Iterable[str] = ()) -> str:
    ranks = sorted({r for rs in report.params_differ.values() for r in rs})
    lines = [
        f"The replicas differ {when}: the parameters of rank(s) {', '.join(map(str, ranks))} are not rank 0's "
        f"({len(report.params_differ)} of {report.compared} tensors compared). Modules that differ:"
    ]
    for module, leaves in group_by_module(report.params_differ).items():
        lines.append(f"  {module}: {', '.join(leaves)}")
    lines.append(
        "DDP applies the same reduced gradients on every rank, so something changed these parameters on some "
        "ranks only: a gradient applied without being reduced (a parameter left out of DDP by the model's own "
        "code, or updated outside backward), a rank that skipped or repeated a step on its own, or a model "
        "that changes its own weights differently per rank.\n"
        "The weights saved from rank 0 are one replica among several: do not trust this run's result."
    )
    frozen = [n for n in frozen_since_build if n in report.params_differ]
    if frozen:
        lines.append(
            f"Of these, {', '.join(frozen[:6])} were trainable when DDP built its reducer and are frozen now: "
            "requires_grad changed after the wrapper was built, and something updated them outside DDP's reduction "
            "(an optimizer that still holds them with weight decay or momentum?).\nFix: freeze parameters before DDP "
            "wraps the model, or take them out of the optimizer when freezing them."
        )
    else:
        lines.append(
            "Fix: look for code that changes parameters on some ranks only (in the model, the loop, or a callback), "
            "or parameters the model's own code leaves out of DDP (_ddp_params_and_buffers_to_ignore) and updates."
        )
    return "\n".join(lines)


def buffers_note(report: ReplicaReport) -> str:
    modules = group_by_module(report.buffers_differ)
    shown = ", ".join(list(modules)[:6]) + (" ..." if len(modules) > 6 else "")
    return (
        f"{len(report.buffers_differ)} buffer(s) differ between ranks ({shown}): DDP keeps buffers per rank "
        "between its broadcasts (BatchNorm statistics from each rank's last batch, or all along with "
        "broadcast_buffers=False); rank 0's are the ones saved."
    )
