"""framework=fastnlp: fastNLP 1.0's real ``Trainer``, with the policy in ``torch_kwargs={'ddp_kwargs': ...}``.

fastNLP takes DDP settings only through ``Trainer(..., torch_kwargs={'ddp_kwargs': {...}})``. The usual
advice, ``model_wo_auto_param_call=True``, only stops fastNLP from matching batch keys to ``forward``'s arguments;
it has nothing to do with unused parameters.

Two paths, both here:

* nccl (GPU): fastNLP's own ``TorchDDPDriver`` creates the process group and wraps the model, with our
  ``ddp_kwargs``. That driver hard-codes nccl and cuda.
* gloo (CPU): fastNLP's documented "DDP initialised outside" mode: the process group already exists, the
  model is passed already wrapped in ``DistributedDataParallel`` (with our ``ddp_kwargs``) and
  ``device=None``. fastNLP then calls ``forward`` instead of ``train_step``.

Users with their own fastNLP script take the settings from ``trainer_kwargs(policy)``.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..base import Adapter, WorkerContext
from ..errors import ConfigError
from ..native import MemorySettings, Setting, Translation, call_args, ddp_kwargs
from ..policy import Backend, DDPPolicy, MemoryPolicy, out_of_range
from ..world import run_start


def trainer_kwargs(policy: DDPPolicy) -> dict[str, Any]:
    """Keyword arguments to add to ``fastNLP.Trainer(...)`` for ``policy`` (fastNLP's own DDP driver).

    >>> from adapters.policy import DDPPolicy, UnusedParams
    >>> trainer_kwargs(DDPPolicy(unused_params=UnusedParams.find))
    {'torch_kwargs': {'ddp_kwargs': {'find_unused_parameters': True}}}
    """
    return {"torch_kwargs": {"ddp_kwargs": ddp_kwargs(policy)}}


@dataclass
class FastNLPConfig:
    """The ``framework`` node for framework=fastnlp: the built-in text classifier on synthetic tokens."""

    name: str = "fastnlp"
    n_epochs: int = 2
    # Samples per process per batch.
    batch_size: int = 16
    # Synthetic sequences in the training set (split across the processes by fastNLP's sampler).
    num_samples: int = 256
    seq_len: int = 12
    vocab_size: int = 64
    hidden: int = 32
    lr: float = 0.05
    seed: int = 0
    # The auxiliary head's loss (predicting the share of high tokens). False leaves aux_head out of the
    # loss: the parameters DDP then waits for in vain.
    aux_loss: bool = True
    # fastNLP's progress display: raw (plain lines, good in logs), rich, tqdm or auto.
    progress_bar: str = "raw"
    # fastNLP's own checkpoints of the whole Trainer state (CheckpointCallback, save_object="trainer") every this
    # many epochs, into <run folder>/checkpoints/<launch time>/trainer-epoch_N and trainer-last. 0: none.
    checkpoint_every: int = 0
    # Continue from a checkpoint folder fastNLP wrote (.../trainer-last or trainer-epoch_N): Trainer.run(
    # resume_from=...) restores model, optimizer, epoch and batch position on every rank. null: start afresh.
    resume_from: Optional[str] = None


CHECKPOINT_FILE = "fastnlp_checkpoint.pkl.tar"  # fastNLP.envs.FASTNLP_CHECKPOINT_FILENAME


class FastNLPAdapter(Adapter):
    name = "fastnlp"
    schema = FastNLPConfig

    def _translate(self, kwargs: dict[str, Any], policy: DDPPolicy, backend: Backend) -> Translation:
        if backend is Backend.nccl:
            settings = {"trainer_kwargs": {"driver": "torch", **trainer_kwargs(policy)}}
            snippet = f"Trainer(model, driver='torch', ..., torch_kwargs={{'ddp_kwargs': {kwargs!r}}})"
            how = "fastNLP's TorchDDPDriver creates the nccl process group and wraps the model with ddp_kwargs."
        else:
            settings = {
                "outside_ddp_kwargs": kwargs,
                "trainer_kwargs": {"driver": "torch", "device": None, **trainer_kwargs(policy)},
            }
            snippet = (f"Trainer(DistributedDataParallel(model{call_args(kwargs)}), driver='torch', device=None, ..., "
                       f"torch_kwargs={{'ddp_kwargs': {kwargs!r}}})")  # fmt: skip
            how = ("On CPU fastNLP's own DDP driver hard-codes nccl and cuda, so the gloo process group is created "
                   "first and the model is wrapped outside (fastNLP's 'DDP initialised outside' mode).")  # fmt: skip
        notes = (how, "model_wo_auto_param_call (the usual advice) only turns off batch-to-argument matching; it "
                 "does not touch DDP.")  # fmt: skip
        return Translation(settings, snippet, notes)

    def framework_inits_process_group(self, backend: Backend) -> bool:
        return backend is Backend.nccl  # fastNLP's TorchDDPDriver calls init_process_group("nccl") itself

    def memory_settings(self, memory: MemoryPolicy, fw: FastNLPConfig, *, backend: Backend,
                        world_size: int) -> MemorySettings:  # fmt: skip
        out = [Setting("DataLoader.batch_size", memory.batch_size or fw.batch_size)]
        if memory.num_workers is not None:
            out.append(Setting("DataLoader.num_workers", memory.num_workers))
        if memory.pin_memory is not None:
            out.append(Setting("DataLoader.pin_memory", memory.pin_memory))
        if memory.amp is not None:
            gpu = backend is Backend.nccl or not memory.amp
            out.append(Setting("Trainer.fp16", memory.amp, unchanged="" if gpu else "fastNLP's fp16 needs CUDA"))
        return MemorySettings(tuple(out))

    def validate(self, framework_cfg: FastNLPConfig) -> None:
        for key in ("n_epochs", "batch_size", "num_samples", "seq_len", "hidden"):
            if getattr(framework_cfg, key) < 1:
                raise out_of_range(f"framework.{key}", getattr(framework_cfg, key), "it must be at least 1",
                                   f"framework.{key}=1 or more")  # fmt: skip
        if framework_cfg.vocab_size < 4:
            raise out_of_range("framework.vocab_size", framework_cfg.vocab_size, "it must be at least 4",
                               "framework.vocab_size=64")  # fmt: skip
        if not framework_cfg.lr > 0:
            raise out_of_range("framework.lr", framework_cfg.lr, "the learning rate must be above 0",
                               "framework.lr=0.05")  # fmt: skip
        if framework_cfg.checkpoint_every < 0:
            raise out_of_range("framework.checkpoint_every", framework_cfg.checkpoint_every, "it must be 0 (no "
                               "checkpoints) or more", "framework.checkpoint_every=1")  # fmt: skip
        if framework_cfg.resume_from is not None:
            folder = Path(framework_cfg.resume_from).expanduser()
            if not (folder / CHECKPOINT_FILE).is_file():
                raise ConfigError(
                    f"framework.resume_from={framework_cfg.resume_from}: no fastNLP trainer checkpoint there "
                    f"({CHECKPOINT_FILE} missing).\nFix: a folder fastNLP's CheckpointCallback wrote with "
                    "save_object='trainer', such as <run folder>/checkpoints/<time>/trainer-last "
                    "(framework.checkpoint_every=1 writes them)."
                )
        choices = ("raw", "rich", "tqdm", "auto")
        if framework_cfg.progress_bar not in choices:
            raise ConfigError(
                f"framework.progress_bar={framework_cfg.progress_bar} is not one of: {', '.join(choices)}."
            )

    def run(self, ctx: WorkerContext) -> dict[str, Any]:
        import torch
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DataLoader

        # fastNLP names its checkpoint folders by FASTNLP_LAUNCH_TIME, which each process sets on import unless its
        # launcher did: the run's own start time, the same on every rank, gives the ranks one folder.
        started = time.localtime(run_start())
        os.environ.setdefault("FASTNLP_LAUNCH_TIME", time.strftime("%Y-%m-%d-%H_%M_%S_000000", started))
        with warnings.catch_warnings():  # fastNLP 1.0.1 imports pkg_resources, which warns on every import
            warnings.simplefilter("ignore", UserWarning)
            from fastNLP import Trainer

        from ..demo import SyntheticTokens, TextClassifier

        fw = ctx.framework
        torch.manual_seed(fw.seed)
        model = TextClassifier(fw.vocab_size, fw.hidden, aux_loss=fw.aux_loss)
        data = SyntheticTokens(fw.num_samples, fw.seq_len, fw.vocab_size, fw.seed)
        memory = ctx.memory_applied
        # fastNLP swaps in a distributed sampler itself.
        loader = DataLoader(data, batch_size=memory["DataLoader.batch_size"], shuffle=True, drop_last=True,
                            num_workers=memory.get("DataLoader.num_workers", 0),
                            pin_memory=memory.get("DataLoader.pin_memory", False))  # fmt: skip
        fp16 = memory.get("Trainer.fp16")
        trainer_args = dict(ctx.native.settings["trainer_kwargs"], **({} if fp16 is None else {"fp16": fp16}))
        outside = "outside_ddp_kwargs" in ctx.native.settings
        model.to(ctx.device)

        ddp_args = dict(ctx.native.settings["trainer_kwargs"]["torch_kwargs"]["ddp_kwargs"])
        trainer_args["torch_kwargs"] = {"ddp_kwargs": ddp_args}
        if outside:
            model = ctx.track_ddp(DistributedDataParallel(model, **ddp_args))
        optimizer = torch.optim.SGD(model.parameters(), lr=fw.lr, momentum=0.9)
        callbacks = [_first_step_callback()(ctx)]
        if fw.checkpoint_every:
            from fastNLP import CheckpointCallback

            folder = str(ctx.run_dir / "checkpoints")
            callbacks.append(CheckpointCallback(folder=folder, every_n_epochs=fw.checkpoint_every, last=True,
                                                save_object="trainer"))  # fmt: skip
        trainer = Trainer(model=model, optimizers=optimizer, train_dataloader=loader, n_epochs=fw.n_epochs,
                          progress_bar=fw.progress_bar, callbacks=callbacks, **trainer_args)  # fmt: skip
        if ctx.ddp_model is None:  # fastNLP wrapped it (nccl path), in a _DDPWrappingModel of its own
            ctx.track_ddp(trainer.driver.model)
        # fastNLP's driver SIGKILLs every other rank when one raises, before they can say why; the launcher
        # stops them itself, after each had the chance to report.
        trainer.driver._pids = None
        if fw.resume_from is not None:
            ctx.log.info("resuming fastNLP's Trainer from %s (framework.resume_from)", fw.resume_from)
        trainer.run(resume_from=None if fw.resume_from is None else str(Path(fw.resume_from).expanduser()))
        return {"epochs": fw.n_epochs, "batches": trainer.global_forward_batches}


def _first_step_callback() -> type:
    """A fastNLP callback that calls ``ctx.first_step_done()`` after the first backward (fastNLP imported here)."""
    from fastNLP import Callback

    class FirstStep(Callback):
        def __init__(self, ctx: WorkerContext):
            self.ctx = ctx

        def on_after_backward(self, trainer: Any) -> None:
            self.ctx.first_step_done()

    return FirstStep


ADAPTER = FastNLPAdapter()
