"""framework=transformers: the Hugging Face Transformers ``Trainer``, the policy in ``TrainingArguments.ddp_*``.

The Trainer builds its own DDP handler from four fields: ``ddp_find_unused_parameters``, ``ddp_static_graph``,
``ddp_bucket_cap_mb`` and ``ddp_broadcast_buffers`` (Accelerate-level DDP settings are not used). Left unset,
``ddp_find_unused_parameters`` becomes True for every model unless activation checkpointing is on: the search
after every forward is paid by default. Here it is always written: False unless the policy asks for the search.

The demo is a small BERT for masked-language modelling built from a config (random weights, no download), with
its output layer tied to the word embeddings; ``framework.pooler=true`` keeps an encoder pooler the loss never
uses. The wrapper ``Trainer.train()`` builds is handed to the engine when training begins: auto decides from the
Trainer's own first steps (its column removal, collator, loss and accumulation), tied parameters left out under
every name they have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..base import Adapter, WorkerContext
from ..building import check_target, names_in_source, refuse_objects
from ..errors import ConfigError, close_matches
from ..native import MemorySettings, Setting, Translation
from ..policy import Backend, DDPPolicy, MemoryPolicy, out_of_range
from .hf_parts import (
    TRAINING_ARGUMENTS,
    buffer_note,
    refuse_unsupported,
    training_arguments,
)

DEMO_MODEL = "adapters.frameworks.hf_parts.tiny_bert"
DEMO_DATA = "adapters.frameworks.hf_parts.SyntheticMLM"
# TrainingArguments fields the run decides itself, and where they come from instead.
OWNED = {
    **{name: "the DDP policy (ddp=..., ddp.*) decides it" for name in TRAINING_ARGUMENTS.values()},
    "use_cpu": "launcher.backend decides it (gloo: CPU)",
    "ddp_backend": "launcher.backend decides it",
    "output_dir": "every run writes to its own run folder (<run folder>/trainer)",
    "max_steps": "use framework.max_steps",
    "per_device_train_batch_size": "use framework.batch_size (or memory.batch_size)",
    "learning_rate": "use framework.lr",
    "seed": "use framework.seed",
    "logging_steps": "use framework.log_every",
    "bf16": "use memory.amp",
    "fp16": "use memory.amp",
    "report_to": "the run reports to no tracker (report_to='none'); build the Trainer in your own script for one",
    "disable_tqdm": "the progress bar shows on rank 0 only",
}


@dataclass
class TransformersConfig:
    """The ``framework`` node for framework=transformers."""

    name: str = "transformers"
    # Optimizer steps (TrainingArguments(max_steps=...)). null: the Trainer trains by epochs
    # (+framework.args.num_train_epochs=N, its default 3); setting both is refused (max_steps would win).
    max_steps: Optional[int] = 20
    # Samples per process per step (per_device_train_batch_size).
    batch_size: int = 8
    lr: float = 5e-4
    seed: int = 0
    # The Trainer logs loss every this many steps (logging_steps); rank 0 adds throughput.
    log_every: int = 5
    # Handed to the model's constructor when it takes ``pooler`` and the model node does not set it: the demo then
    # keeps an encoder pooler its masked-LM loss never uses (parameters that get no gradient).
    pooler: bool = False
    # The model (a PreTrainedModel or any torch module returning a loss): ``_target_`` plus its arguments.
    model: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_MODEL})
    # The training dataset (items are dicts the data collator stacks): ``_target_`` plus its arguments.
    data: Dict[str, Any] = field(default_factory=lambda: {"_target_": DEMO_DATA})
    # More TrainingArguments fields, plain values (warmup_steps, weight_decay, save_steps, ...).
    args: Dict[str, Any] = field(default_factory=dict)
    # Trainer.train(resume_from_checkpoint=...): a checkpoint-N folder the Trainer wrote.
    resume_from_checkpoint: Optional[str] = None


class TransformersAdapter(Adapter):
    name = "transformers"
    schema = TransformersConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        fields = {**training_arguments(kwargs), **_device_arguments(backend)}
        snippet = f"TrainingArguments(..., {', '.join(f'{k}={v!r}' for k, v in fields.items())})"
        notes = (
            "The Trainer builds its own DDP handler from these ddp_* fields; Accelerate-level DDP settings are not "
            "used. Left unset, ddp_find_unused_parameters becomes True for every model (unless activation "
            "checkpointing is on), paid in every step: it is always written here.",
        )
        return Translation({"TrainingArguments": fields}, snippet, (*notes, *buffer_note(policy, "the Trainer")))

    def check_policy(self, policy: DDPPolicy) -> None:
        refuse_unsupported(policy, self.name, tuple(TRAINING_ARGUMENTS), "TrainingArguments (ddp_* fields)")

    def memory_settings(self, memory: MemoryPolicy, fw: TransformersConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        out = [Setting("TrainingArguments.per_device_train_batch_size", memory.batch_size or fw.batch_size)]
        if memory.num_workers is not None:
            out.append(Setting("TrainingArguments.dataloader_num_workers", memory.num_workers))
        if memory.pin_memory is not None:
            out.append(Setting("TrainingArguments.dataloader_pin_memory", memory.pin_memory))
        if memory.amp is not None:
            name = "TrainingArguments.fp16" if backend is Backend.nccl else "TrainingArguments.bf16"
            out.append(Setting(name, memory.amp))
        return MemorySettings(tuple(out))

    def explain_framework(self, fw: TransformersConfig) -> list[str]:
        extra = "".join(f", {k}={v!r}" for k, v in fw.args.items())
        lines = [f"TrainingArguments(output_dir=<run folder>/trainer, max_steps={fw.max_steps}, "
                 f"learning_rate={fw.lr}, logging_steps={fw.log_every}{extra})"]  # fmt: skip
        if fw.resume_from_checkpoint:
            lines.append(f"Trainer.train(resume_from_checkpoint={fw.resume_from_checkpoint!r})")
        return lines

    def validate(self, fw: TransformersConfig) -> None:
        if fw.max_steps is not None and "num_train_epochs" in fw.args:
            raise ConfigError(
                f"framework.args.num_train_epochs={fw.args['num_train_epochs']} and framework.max_steps="
                f"{fw.max_steps}: the Trainer trains max_steps whenever it is set, and num_train_epochs would be "
                "ignored.\nFix: framework.max_steps=null to train by epochs, or drop framework.args.num_train_epochs."
            )
        for key in ("max_steps", "batch_size", "log_every"):
            if getattr(fw, key) is not None and getattr(fw, key) < 1:
                raise out_of_range(f"framework.{key}", getattr(fw, key), "it must be at least 1",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if not fw.lr > 0:
            raise out_of_range("framework.lr", fw.lr, "the learning rate must be above 0", "framework.lr=5e-4")
        refuse_objects("framework.args", dict(fw.args), "remove it, or build TrainingArguments in your own script "
                       "with adapters.api.Policy(...).training_arguments().")  # fmt: skip
        known = names_in_source("transformers", "training_args.py", "TrainingArguments")
        for key in fw.args:
            if key in OWNED:
                raise ConfigError(f"framework.args.{key}: {OWNED[key]}.\nFix: remove it (~framework.args.{key}).")
            if known and key not in known:
                near = close_matches(key, known)
                hint = f" Did you mean {', '.join(near)}?" if near else ""
                raise ConfigError(
                    f"framework.args.{key}: TrainingArguments has no field '{key}'.{hint}\n"
                    f"Fix: remove it (~framework.args.{key}) or spell one of TrainingArguments' own fields."
                )
        for key, demo in (("model", DEMO_MODEL), ("data", DEMO_DATA)):
            node = dict(getattr(fw, key))
            if node.get("_target_") != demo:  # the built-in ones exist (and would import transformers here)
                check_target(f"framework.{key}", node, demo)
        if fw.resume_from_checkpoint is not None:
            folder = Path(fw.resume_from_checkpoint).expanduser()
            if not (folder / "trainer_state.json").is_file():
                raise ConfigError(
                    f"framework.resume_from_checkpoint={fw.resume_from_checkpoint}: not a checkpoint the Trainer "
                    "wrote (no trainer_state.json there).\nFix: a folder such as <run folder>/trainer/checkpoint-20."
                )

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import torch

        from ..building import build
        from .hf_parts import set_rank_environment

        set_rank_environment(ctx)
        from transformers import Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # through the rank's own logging: rank 0's console, every rank's log
        hf_logging.enable_propagation()
        fw = ctx.framework
        memory = ctx.memory_applied
        torch.manual_seed(fw.seed)
        model = build("framework.model", fw.model, pooler=fw.pooler).to(ctx.device)
        data = build("framework.data", fw.data)
        batch_size = memory["TrainingArguments.per_device_train_batch_size"]

        native = dict(ctx.native.settings["TrainingArguments"])
        extra = {
            item.name.removeprefix("TrainingArguments."): item.value for item in memory.items if not item.unchanged
        }
        args = TrainingArguments(
            output_dir=str(ctx.run_dir / "trainer"), max_steps=-1 if fw.max_steps is None else fw.max_steps,
            learning_rate=fw.lr, seed=fw.seed,
            logging_steps=fw.log_every, report_to="none", disable_tqdm=not ctx.is_main,
            **{**extra, **native, **dict(fw.args)},
        )  # fmt: skip
        ctx.training_facts(accumulation=args.gradient_accumulation_steps > 1)
        built: list[Any] = []
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[_policy_callback(ctx, batch_size, lambda: built[0])])  # fmt: skip
        built.append(trainer)
        resume = None if fw.resume_from_checkpoint is None else str(Path(fw.resume_from_checkpoint).expanduser())
        if resume:
            ctx.log.info("continuing the Trainer's checkpoint %s (framework.resume_from_checkpoint)", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(ctx.run_dir / "model"))  # rank 0 writes: from_pretrained(<run folder>/model)
        return {"steps": trainer.state.global_step, "loss": round(result.training_loss, 4)}


def _device_arguments(backend: Backend) -> dict[str, Any]:
    return {"ddp_backend": backend.name} if backend is Backend.nccl else {"use_cpu": True, "ddp_backend": "gloo"}


def _policy_callback(ctx: WorkerContext, batch_size: int, trainer_of: Any) -> Any:
    """A TrainerCallback (transformers imported here) that hands the Trainer's DDP wrapper to the engine when
    training begins (refusing a run without one), stops strict after the first backward, and logs step, loss and
    throughput from rank 0. ``trainer_of()``: the Trainer, built after its callbacks."""
    import time

    from transformers import TrainerCallback

    from .hf_parts import check_distributed, check_wrapped

    class PolicyCallback(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer = trainer_of()
            check_distributed(trainer.accelerator.state, ctx.world_size, "The Trainer's Accelerate")
            check_wrapped(trainer.model_wrapped, ctx.world_size, "The Trainer")
            ctx.track_ddp(trainer.model_wrapped)
            self.started = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ctx.first_step_done()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if ctx.is_main and logs and "loss" in logs:
                rate = state.global_step * batch_size * ctx.world_size / max(time.perf_counter() - self.started, 1e-9)
                ctx.log.info("step %d/%d | loss %.4f | %.0f samples/s", state.global_step, state.max_steps,
                             logs["loss"], rate)  # fmt: skip

    return PolicyCallback()


ADAPTER = TransformersAdapter()
