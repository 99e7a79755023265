"""The memory group: one set of keys for every framework, and out-of-memory handling (framework=torch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from adapters import registry
from adapters.config import compose, validate
from adapters.errors import ConfigError
from adapters.policy import Backend

from conftest import ENV, TRAIN, grandchildren, output, train

SHORT = ["framework.steps=6", "framework.log_every=2"]

# memory=lowmem, on CPU, in each framework's own terms.
LOWMEM = {
    "torch": {"DataLoader.batch_size": 2, "DataLoader.num_workers": 0, "DataLoader.pin_memory": False,
              "torch.autocast": "bfloat16", "on out of memory": "fail"},
    "mmdet": {"train_dataloader.batch_size": 2, "train_dataloader.num_workers": 0,
              "train_dataloader.pin_memory": False,
              "optim_wrapper.type": "unchanged: mmengine's AmpOptimWrapper needs a GPU"},
    "fastnlp": {"DataLoader.batch_size": 2, "DataLoader.num_workers": 0, "DataLoader.pin_memory": False,
                "Trainer.fp16": "unchanged: fastNLP's fp16 needs CUDA"},
    "nnunet": {"plans batch_size (global)": 4, "nnUNet_n_proc_DA": 0, "augmenter pin_memory": False,
               "autocast": "unchanged: nnU-Net uses autocast on cuda and none on CPU"},
    "lightning": {"DataModule.batch_size (per process)": 2, "DataModule.num_workers": 0,
                  "DataModule.pin_memory": False, "Trainer.precision": "bf16-mixed"},
    "accelerate": {"DataLoader.batch_size (per process)": 2, "DataLoader.num_workers": 0,
                   "DataLoader.pin_memory": False, "Accelerator.mixed_precision": "bf16"},
    "transformers": {"TrainingArguments.per_device_train_batch_size": 2, "TrainingArguments.dataloader_num_workers": 0,
                     "TrainingArguments.dataloader_pin_memory": False, "TrainingArguments.bf16": True},
}  # fmt: skip


@pytest.mark.parametrize("framework", sorted(registry.FRAMEWORKS))
def test_lowmem_in_each_framework_s_own_terms(framework):
    checked = validate(compose([f"framework={framework}", "memory=lowmem"]), for_run=False)
    adapter = registry.load_adapter(framework)
    settings = adapter.memory_settings(checked.memory, checked.framework_cfg, backend=Backend.gloo, world_size=2)
    assert settings.shown() == LOWMEM[framework]


def test_unset_memory_keys_keep_the_framework_s_values():
    checked = validate(compose(["framework=mmdet"]), for_run=False)
    adapter = registry.load_adapter("mmdet")
    settings = adapter.memory_settings(checked.memory, checked.framework_cfg, backend=Backend.gloo, world_size=2)
    assert settings.items == ()


def test_halve_needs_a_loop_of_our_own():
    with pytest.raises(ConfigError, match="memory.on_oom=halve needs a training loop"):
        validate(compose(["framework=mmdet", "memory.on_oom=halve"]), for_run=False)


@pytest.mark.slow
def test_memory_batch_size_reaches_the_loader(workdir):
    proc = train(workdir, *SHORT, "memory.batch_size=4", "memory.amp=true")
    assert proc.returncode == 0, output(proc)
    assert "6 steps of 4 samples per process, autocast bfloat16" in proc.stdout


@pytest.mark.slow
def test_halve_recovers_from_out_of_memory_on_one_rank(workdir):
    proc = train(workdir, *SHORT, "memory.on_oom=halve",
                 env={"ADAPTERS_TEST_OOM_ABOVE": "4", "ADAPTERS_TEST_OOM_RANKS": "1"})  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert ("out of memory on rank(s) 1 at batch size 16 per process: every rank dropped the step and goes on "
            "from the same samples at batch size 8 (memory.on_oom=halve)") in proc.stdout  # fmt: skip
    assert "at batch size 8 per process: every rank dropped the step and goes on from the same samples at batch " \
           "size 4" in proc.stdout  # fmt: skip
    assert "step 6/6" in proc.stdout and "batch_size=4" in proc.stdout


@pytest.mark.slow
def test_halve_stops_below_the_minimum_with_the_sizes_tried(workdir):
    proc = train(workdir, *SHORT, "memory.on_oom=halve", "memory.min_batch_size=4",
                 env={"ADAPTERS_TEST_OOM_ABOVE": "1"})  # fmt: skip
    assert proc.returncode == 1, output(proc)
    assert "out of memory at every batch size tried (per process: 16, 8, 4; memory.min_batch_size=4)" in proc.stderr
    assert "Lower memory.batch_size first" in proc.stderr


@pytest.mark.slow
def test_fail_stops_at_once_naming_what_to_lower(workdir):
    proc = train(workdir, *SHORT, env={"ADAPTERS_TEST_OOM_ABOVE": "4", "ADAPTERS_TEST_OOM_RANKS": "1"})
    assert proc.returncode == 1, output(proc)
    assert proc.stderr.startswith("error: The run stopped on rank 1: it ran out of memory.")
    assert "memory.batch_size" in proc.stderr and "memory.on_oom=halve" in proc.stderr


@pytest.mark.slow
def test_a_killed_data_loader_worker_is_explained(workdir):
    cmd = [sys.executable, str(TRAIN), "memory.num_workers=1", "framework.steps=100000", "ddp=strict"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = [], time.monotonic() + 120
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        workers = grandchildren(proc.pid)
        if len(workers) >= 2:  # each rank's loader worker is up
            time.sleep(1)
            for pid in grandchildren(proc.pid)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed, "no data-loader worker was found to kill"
    assert proc.returncode == 1, stdout + stderr
    assert "its background data-loading workers died" in stderr
    assert "memory.num_workers" in stderr and "out-of-memory killer" in stderr
