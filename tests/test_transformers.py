"""framework=transformers: the Transformers Trainer, 2 processes, gloo on CPU, the policy in TrainingArguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapters.api import Policy

from adapter_contract import AdapterContract
from conftest import TEAM_PRESET, assert_same_training, auto_choice, output, requires, run_dirs, train

transformers = requires("transformers")
POOLER = "framework.pooler=true"  # the demo BERT keeps a pooler its masked-LM loss never uses


class TestTransformersAdapter(AdapterContract):
    name = "transformers"

    def native(self, ddp_kwargs, backend):
        fields = {"ddp_find_unused_parameters": bool(ddp_kwargs.get("find_unused_parameters"))}
        if ddp_kwargs.get("static_graph"):
            fields["ddp_static_graph"] = True
        device = {"ddp_backend": "nccl"} if backend.name == "nccl" else {"use_cpu": True, "ddp_backend": "gloo"}
        return {"TrainingArguments": {**fields, **device}}


def test_explain_prints_training_arguments_without_transformers():
    code = ("import sys; from adapters.cli import explain; print(explain(['framework=transformers', 'ddp=strict'])); "
            "print('transformers' in sys.modules or 'accelerate' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # strict is written out: left unset, the Trainer would turn the search on for this model.
    assert "TrainingArguments(..., ddp_find_unused_parameters=False, use_cpu=True, ddp_backend='gloo')" in out
    assert out.strip().endswith("False")


def test_training_arguments_for_your_own_script():
    assert Policy(["ddp=static", "ddp.bucket_cap_mb=50"], framework="transformers").training_arguments() == {
        "ddp_find_unused_parameters": False, "ddp_static_graph": True, "ddp_bucket_cap_mb": 50,
    }  # fmt: skip
    assert Policy(["ddp=safe"], framework="transformers").training_arguments() == {"ddp_find_unused_parameters": True}


@pytest.mark.parametrize("override,words", [
    ("+framework.args.ddp_static_graph=true", "framework.args.ddp_static_graph: the DDP policy (ddp=..., ddp.*)"),
    ("ddp.gradient_as_bucket_view=true", "ddp.gradient_as_bucket_view: framework=transformers has no place for "
                                         "DDP's 'gradient_as_bucket_view'"),
    ("+framework.args.report_to=wandb", "framework.args.report_to: the run reports to no tracker"),
    ("framework.resume_from_checkpoint=/nowhere", "not a checkpoint the Trainer wrote (no trainer_state.json"),
    ("+framework.args.num_train_epochs=1", "framework.args.num_train_epochs=1 and framework.max_steps=20: the Trainer "
                                           "trains max_steps whenever it is set"),
])  # fmt: skip
def test_bad_options_name_the_key(workdir, override, words):
    proc = train(workdir, "framework=transformers", override)
    if "not installed" in proc.stderr:
        pytest.skip("transformers not installed: the install hint is tested in test_bad_input")
    assert proc.returncode == 2, output(proc)
    assert words in proc.stderr
    assert "Traceback" not in output(proc)
    assert run_dirs(workdir) == []


@transformers
def test_a_misspelt_training_argument_is_named(workdir):
    proc = train(workdir, "framework=transformers", "+framework.args.warmup_step=3")
    assert proc.returncode == 2, output(proc)
    assert "TrainingArguments has no field 'warmup_step'. Did you mean warmup_steps?" in proc.stderr


@transformers
@pytest.mark.slow
def test_strict_names_the_pooler(workdir):
    proc = train(workdir, "framework=transformers", "ddp=strict", POOLER, "framework.max_steps=4")
    assert proc.returncode == 1, output(proc)
    assert "DDP stopped on ranks 0, 1: 2 parameters got no gradient" in proc.stderr
    assert "bert.pooler.dense (ranks 0, 1): bert.pooler.dense.weight, bert.pooler.dense.bias" in proc.stderr


@transformers
@pytest.mark.slow
def test_the_trainer_trains_saves_and_resumes_with_safe(workdir):
    proc = train(workdir, "framework=transformers", "ddp=safe")
    assert proc.returncode == 0, output(proc)
    assert "step 20/20" in proc.stdout and "replicas equal at the end of the run" in proc.stdout
    [run_dir] = run_dirs(workdir)
    for rank in (0, 1):
        assert "DDP as built: find_unused_parameters=True" in (run_dir / f"rank{rank}.log").read_text()
    # After training: Transformers' own loading, tied weights kept; then the Trainer continues its checkpoint.
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(run_dir / "model")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    checkpoint = run_dir / "trainer" / "checkpoint-20"
    more = train(workdir, "framework=transformers", "ddp=safe", f"framework.resume_from_checkpoint={checkpoint}",
                 "framework.max_steps=24")  # fmt: skip
    assert more.returncode == 0, output(more)
    assert "finished: steps=24" in more.stdout and "step 5/24" not in more.stdout, "it went on from step 20"


@transformers
@pytest.mark.slow
@pytest.mark.parametrize("overrides,built", [
    (["ddp=static", POOLER], "find_unused_parameters=False, static_graph=True"),
    # a tied weight named by one of its names: left out of DDP under both, kept in sync by the guard
    (["ddp=ignore", "ddp.ignore=[cls.predictions.decoder.weight]"],
     "static_graph=False, forward_sync_buffers=True, bucket_cap_mb=25.0, gradient_as_bucket_view=False, ignored=2"),
])  # fmt: skip
def test_each_preset_reaches_the_trainers_ddp(workdir, overrides, built):
    proc = train(workdir, "framework=transformers", *overrides, "framework.max_steps=6")
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert f"{built}" in proc.stdout
    assert "replicas equal at the end of the run" in proc.stdout
    if "ddp=ignore" in overrides:
        assert "DDP leaves out bert.embeddings.word_embeddings: bert.embeddings.word_embeddings.weight" in proc.stdout
        assert "left out of DDP got a gradient in training step 1, on 2 of 2 ranks" in proc.stdout


@transformers
@pytest.mark.slow
def test_auto_is_the_run_of_the_setting_it_chose_through_the_trainers_own_input_preparation(workdir):
    # The dataset has a column BERT's forward does not take: the Trainer drops it before collating, and ddp=auto
    # decides from the Trainer's own steps.
    model = ["framework=transformers", POOLER, "framework.data._target_=my_pkg.hf_data.IndexedMLM",
             "framework.max_steps=6", "+framework.args.gradient_accumulation_steps=2"]  # fmt: skip
    auto, _ = assert_same_training(workdir, [*model, "ddp=auto"],
                                   [*model, "ddp=ignore", "ddp.ignore=[bert.pooler.dense]"])  # fmt: skip
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient" in auto
    assert auto_choice(auto) == ["ddp=ignore", "ddp.ignore=[bert.pooler.dense.weight,bert.pooler.dense.bias]"]


@transformers
@pytest.mark.slow
def test_a_schedule_by_epochs_takes_effect(workdir):
    proc = train(workdir, "framework=transformers", "framework.max_steps=null", "+framework.args.num_train_epochs=1",
                 "+framework.data.size=64")  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert "finished: steps=4" in proc.stdout  # 64 samples / 2 ranks / 8 per step: 4 steps in the one epoch


@transformers
@pytest.mark.slow
def test_static_graph_with_the_trainers_gradient_accumulation_trains(workdir):
    # torch asserts (expect_autograd_hooks_) when a static graph's first iteration is a micro-step under no_sync
    proc = train(workdir, "framework=transformers", "ddp=static", POOLER, "framework.max_steps=4",
                 "+framework.args.gradient_accumulation_steps=2")  # fmt: skip
    assert proc.returncode == 0, output(proc)  # and run() compared every rank's parameter digests
    assert "INTERNAL ASSERT" not in output(proc)
    assert "static_graph=True with gradient accumulation: the reducer records its graph at the first synchronised" \
           " step" in proc.stdout  # fmt: skip


@transformers
@pytest.mark.slow
def test_the_team_preset_runs_auto_on_the_trainer(workdir):
    proc = train(workdir, "framework=transformers", *TEAM_PRESET, POOLER, "framework.max_steps=6")
    assert proc.returncode == 0, output(proc)
    assert "ddp=auto chose ignore: the same 2 parameters got no gradient in every observed step" in proc.stdout
    assert "(observed: the first 3 training step(s)" in proc.stdout
    assert "find_unused_parameters=False, static_graph=False" in proc.stdout
    assert "bucket_cap_mb=50.0, gradient_as_bucket_view=False, ignored=2" in proc.stdout
