"""What framework=accelerate and framework=transformers share: the rank's environment as Accelerate reads it, the
check that DDP is really on, where DDP's keywords go in each, and the built-in demo pieces.

Pure at the top (no Hugging Face import); functions that need a library import it themselves.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..errors import ConfigError
from ..policy import DDPPolicy

# accelerate.DistributedDataParallelKwargs's fields (accelerate 1.15): the DDP settings Accelerate can carry.
HANDLER_FIELDS = ("dim", "broadcast_buffers", "bucket_cap_mb", "find_unused_parameters", "check_reduction",
                  "gradient_as_bucket_view", "static_graph", "comm_hook", "comm_wrapper",
                  "comm_state_option")  # fmt: skip
# DDP keyword -> TrainingArguments field (transformers 5.24): all the Trainer lets through to DDP.
TRAINING_ARGUMENTS = {
    "find_unused_parameters": "ddp_find_unused_parameters",
    "static_graph": "ddp_static_graph",
    "bucket_cap_mb": "ddp_bucket_cap_mb",
    "broadcast_buffers": "ddp_broadcast_buffers",
}


def handler_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """DDP keyword arguments in ``DistributedDataParallelKwargs``'s terms (torch 2.13's ``forward_sync_buffers`` is
    the handler's ``broadcast_buffers``)."""
    return {("broadcast_buffers" if k == "forward_sync_buffers" else k): v for k, v in kwargs.items()}


def training_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``TrainingArguments`` ddp_* fields for DDP keyword arguments. ``ddp_find_unused_parameters`` is always
    written: left unset, the Trainer turns the search on for every model (unless activation checkpointing is)."""
    kwargs = handler_kwargs(kwargs)
    out = {"ddp_find_unused_parameters": bool(kwargs.get("find_unused_parameters", False))}
    for key, value in kwargs.items():
        if key != "find_unused_parameters":
            out[TRAINING_ARGUMENTS[key]] = value
    return out


def buffer_note(policy: DDPPolicy, where: str) -> tuple[str, ...]:
    """ddp.broadcast_buffers=false means less here than with torch's own ``forward_sync_buffers=False``."""
    if policy.broadcast_buffers is False:
        return (f"ddp.broadcast_buffers=false reaches DDP as broadcast_buffers=False through {where}: buffers are "
                "then not made equal across ranks even once, when DDP is built (torch 2.13's forward_sync_buffers="
                "False, used by the other frameworks here, still does that once).",)  # fmt: skip
    return ()


def refuse_unsupported(policy: DDPPolicy, framework: str, supported: tuple[str, ...], where: str) -> None:
    """A DDP setting the framework has no place for is refused, naming it, the ones it has, and the way out."""
    from ..native import ddp_kwargs

    for key in handler_kwargs(ddp_kwargs(policy)):
        if key not in supported:
            origin = f"ddp.kwargs.{key}" if key in policy.kwargs else f"ddp.{key}"
            raise ConfigError(
                f"{origin}: framework={framework} has no place for DDP's '{key}': {where} takes only "
                f"{', '.join(supported)}.\nFix: remove it (~{origin}), or set it on DDP yourself in your own script."
            )


def thread_lock_for_tqdm() -> None:
    """tqdm's lock a thread lock: its default, a multiprocessing lock, is never released by a rank that ends with
    os._exit (a "leaked semaphore" warning at the end of every run)."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def processes_per_node(world_size: int) -> int:
    """Ranks on this machine: LOCAL_WORLD_SIZE, which every launcher here sets (the local one, torchrun, submitit
    through World.adopt_submitit); the whole world where it is absent."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if per_node < 1 or world_size % per_node:
        raise ConfigError(f"LOCAL_WORLD_SIZE={per_node} does not divide the {world_size} processes evenly across "
                          "machines.\nFix: start the same number of processes on every machine.")  # fmt: skip
    return per_node


def set_rank_environment(ctx: Any) -> None:
    """The variables Accelerate reads to find this rank (it re-reads them on CPU and would otherwise see one
    process), and OMP_NUM_THREADS as this rank already runs (unset, Accelerate sets its own thread count)."""
    import torch

    per_node = processes_per_node(ctx.world_size)
    os.environ.update({"RANK": str(ctx.rank), "WORLD_SIZE": str(ctx.world_size), "LOCAL_RANK": str(ctx.local_rank),
                       "LOCAL_WORLD_SIZE": str(per_node)})  # fmt: skip
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")  # read by Accelerate only; the process group exists already
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    thread_lock_for_tqdm()


def check_distributed(state: Any, world_size: int, what: str) -> None:
    """Refuse a run where Accelerate set itself up without DDP: every rank would train alone, unsynchronised,
    and exit 0 (torchrun with a plain ``Accelerator()`` on a machine without a GPU; ``accelerate launch --cpu``)."""
    from accelerate.utils import DistributedType

    kind = state.distributed_type
    if world_size > 1 and (kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
                           or state.num_processes != world_size):  # fmt: skip
        raise ConfigError(
            f"{what} set itself up as {kind} with {state.num_processes} process(es), not DDP over {world_size}: "
            "each rank would train on its own and the replicas drift apart.\nFix: on CPU, Accelerator(cpu=True) "
            "(TrainingArguments(use_cpu=True, ddp_backend='gloo')) under torchrun; on GPUs, one visible GPU per rank."
        )


def check_wrapped(model: Any, world_size: int, what: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if world_size > 1 and not isinstance(model, DistributedDataParallel):
        raise ConfigError(
            f"{what} did not wrap the model in DistributedDataParallel (it is a {type(model).__name__}): the ranks "
            "would not synchronise their gradients.\nFix: run under a launcher that starts one process per device "
            "(train.py, torchrun) with Accelerate's distributed state on."
        )


def tiny_bert(pooler: bool = False, vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2,
              seq_len: int = 16) -> Any:  # fmt: skip
    """A small BERT for masked-language modelling, built from a config with random weights (no download). Its
    output layer's weight is tied to the word embeddings (and its bias to the prediction head's), as in every
    BERT. ``pooler=True`` keeps the encoder's pooler, as a checkpoint saved from a classifier carries it: the
    masked-LM loss never uses it, so its parameters get no gradient."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=hidden * 2, max_position_embeddings=seq_len)  # fmt: skip
    model = BertForMaskedLM(config)
    if pooler:
        model.bert = BertModel(config, add_pooling_layer=True)
        model.tie_weights()
    return model


class SyntheticMLM:
    """Token sequences that count up from a random start by a random stride (so a masked token can be told from
    its neighbours), with 15% of the positions to predict (labels -100 elsewhere): a map-style dataset of dicts
    the Trainer's default collator stacks."""

    def __init__(self, size: int = 256, seq_len: int = 16, vocab_size: int = 64, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size - 4, (size, 1), generator=g)
        stride = torch.randint(1, 3, (size, 1), generator=g)
        self.input_ids = 4 + (start + stride * torch.arange(seq_len)) % (vocab_size - 4)
        chosen = torch.rand(size, seq_len, generator=g) < 0.15
        chosen[:, 0] = True  # at least one position per sequence
        self.labels = torch.where(chosen, self.input_ids, torch.full_like(self.input_ids, -100))
        self.inputs = torch.where(chosen, torch.full_like(self.input_ids, 3), self.input_ids)  # 3: the mask token

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.inputs[index], "attention_mask": self.inputs[index].new_ones(self.inputs.shape[1]),
                "labels": self.labels[index]}  # fmt: skip
