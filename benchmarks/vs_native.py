"""Each framework's path here against the same training launched that framework's own way, side by side.

For every framework the same model, data, schedule and DDP setting run twice per round, in a rotating order:

* **ours**: this project's rank code (``adapters.worker.run_worker``, the code ``python train.py
  framework=<name> ddp=<preset>`` runs in each rank), from a config composed exactly as ``train.py``
  composes it;
* **native**: what a user of that framework writes without this project, on CPU:
  - fastNLP: a gloo process group, the model wrapped in ``DistributedDataParallel`` and
    ``Trainer(driver="torch", device=None, ...)``: fastNLP's documented mode for DDP set up outside (its own
    DDP driver needs nccl);
  - MMDetection: mmengine's ``Runner.from_cfg(cfg).train()`` from the same config, ``launcher="pytorch"``,
    ``env_cfg.dist_cfg.backend="gloo"`` and ``model_wrapper_cfg`` with the setting and ``device_ids=None``
    (the gloo group created first: mmengine's own ``init_dist`` calls ``torch.cuda.set_device`` and fails
    without a GPU);
  - nnU-Net: nnU-Net's own ``nnUNetTrainer`` with the least a CPU run needs (nnU-Net hard-codes
    ``device_ids=[local_rank]``, which a CPU module refuses) and the setting passed to its ``DDP(...)``;
  - PyTorch Lightning: ``Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true")``
    under torchrun's environment, the fix Lightning's own error message proposes for a module with parameters
    that get no gradient (its default, ``strategy="ddp"``, stops at once on such a module);
  - the Transformers Trainer: ``Trainer(model, TrainingArguments(use_cpu=True, ddp_backend="gloo", ...))``,
    the DDP fields as given or, for the default, left unset (the Trainer then searches for unused
    parameters in every step).

Every run gets two fresh rank processes (nothing carries over between runs), so start-up is left out of the
rate: each figure is the steady training rate, from the start of the framework's second training step to
the start of its last (stamped in the framework's own step function, the same on both sides), as rank 0
saw it. The ratio ours / native is taken per round (pairs cancel drift) and reported as median and
quartiles.

    python benchmarks/vs_native.py --framework fastnlp|mmdet|nnunet|lightning|transformers [--rounds 5]

Run it in the framework's environment: ``python3 -m nox -s bench-fastnlp`` (and bench-mmdet, bench-nnunet,
bench-lightning, bench-transformers).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

COMMON = ["launcher.nproc=2", "launcher.backend=gloo"]

#: framework -> (overrides for its model and schedule, rows: (label, ddp preset, native DDP arguments))
SETUPS: dict[str, tuple[list[str], list[tuple[str, str, dict]]]] = {
    "fastnlp": (
        ["framework=fastnlp", "framework.aux_loss=false", "framework.num_samples=8192", "framework.n_epochs=1"],
        [("same setting: find_unused_parameters=True", "safe", {"find_unused_parameters": True}),
         ("ddp=auto against the usual fix, find_unused_parameters=True", "auto", {"find_unused_parameters": True})],
    ),
    "mmdet": (
        ["framework=mmdet", "framework.max_iters=24", "framework.num_images=48"],
        [("same setting: find_unused_parameters=False", "strict", {"find_unused_parameters": False}),
         ("ddp=auto against mmengine's default, find_unused_parameters=False", "auto",
          {"find_unused_parameters": False})],
    ),
    "nnunet": (
        ["framework=nnunet", "framework.deep_supervision=false", "framework.epochs=1",
         "framework.iterations_per_epoch=30", "framework.val_iterations_per_epoch=1", "framework.batch_size=4",
         "framework.num_workers=0"],
        [("same setting: find_unused_parameters=True", "safe", {"find_unused_parameters": True}),
         ("ddp=auto against the usual fix, find_unused_parameters=True", "auto", {"find_unused_parameters": True})],
    ),
    "lightning": (
        ["framework=lightning", "framework.deep_supervision=false", "framework.max_steps=60",
         "framework.log_every=1000"],
        [("same setting: find_unused_parameters=True", "safe", {"strategy": "ddp_find_unused_parameters_true"}),
         ("ddp=auto against the usual fix, strategy='ddp_find_unused_parameters_true'", "auto",
          {"strategy": "ddp_find_unused_parameters_true"}),
         # the guard's cost on Lightning: the same ignore list, with the guard (ours) and set by hand (theirs)
         ("the heads left out of DDP, guarded, against the same list set by hand", "ignore "
          "ddp.ignore=[net.heads.0,net.heads.1]", {"strategy": "ddp", "ignore": ["net.heads.0", "net.heads.1"]})],
    ),
    "transformers": (
        ["framework=transformers", "framework.pooler=true", "framework.max_steps=60", "framework.log_every=1000",
         "+framework.args.save_strategy=no"],
        [("same setting: ddp_find_unused_parameters=True", "safe", {"ddp_find_unused_parameters": True}),
         ("ddp=auto against the Trainer's default (for this model: find_unused_parameters=True)", "auto", {})],
    ),
}  # fmt: skip


# --- timing: stamps in the framework's own step function, the same on both sides -----------------------


def _stamp_steps(framework: str, stamps: list[float]) -> None:
    """Wrap the framework's training-step method so that every call records its start time."""
    if framework == "fastnlp":
        from fastNLP import Trainer as owner

        name = "train_step"
    elif framework == "mmdet":
        from mmengine.runner import IterBasedTrainLoop as owner

        name = "run_iter"
    elif framework == "transformers":
        from transformers import Trainer as owner

        name = "training_step"
    elif framework == "lightning":  # the demo module's own step, which Lightning calls on both sides
        from adapters.frameworks.lightning_parts import DemoSegmenter as owner

        name = "training_step"
    else:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as owner

        name = "train_step"
    original = getattr(owner, name)

    def stamped(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)

    setattr(owner, name, stamped)


def steady_rate(stamps: list[float]) -> float:
    """Steps per second from the second step's start to the last step's start."""
    if len(stamps) < 3:
        raise RuntimeError(f"only {len(stamps)} training steps were stamped; give the benchmark more steps")
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])


# --- the two sides -------------------------------------------------------------------------------------


def _group(rank: int, world: int) -> None:
    """The gloo group a CPU user creates, meeting at the benchmark's store (see vs_handwritten.shared_store)."""
    import torch.distributed as dist
    from vs_handwritten import shared_store

    store = shared_store(int(os.environ["MASTER_PORT"]), f"native/{os.environ['TORCHELASTIC_RESTART_COUNT']}")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def _ours(rank: int, world: int, job: dict, run_dir: str) -> None:
    from adapters import threads
    from adapters.worker import WorkerSpec, run_worker

    n, _ = threads.plan(0, world, {})
    spec = WorkerSpec(rank, rank, world, job["settings"], run_dir, "gloo", {}, False, n, "benchmark")
    outcome = run_worker(spec)
    if not outcome.ok:
        raise RuntimeError(f"ours, ddp={job['preset']}: {outcome.diagnosis}")


def _native_fastnlp(rank: int, world: int, job: dict, run_dir: str) -> None:
    import torch
    from fastNLP import Trainer
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from adapters.demo import SyntheticTokens, TextClassifier

    fw = job["cfg"]["framework"]
    _group(rank, world)
    torch.manual_seed(fw["seed"])
    model = TextClassifier(fw["vocab_size"], fw["hidden"], aux_loss=fw["aux_loss"])
    data = SyntheticTokens(fw["num_samples"], fw["seq_len"], fw["vocab_size"], fw["seed"])
    loader = DataLoader(data, batch_size=fw["batch_size"], shuffle=True, drop_last=True)
    model = DistributedDataParallel(model, **job["native"])
    optimizer = torch.optim.SGD(model.parameters(), lr=fw["lr"], momentum=0.9)
    Trainer(model=model, optimizers=optimizer, train_dataloader=loader, n_epochs=fw["n_epochs"], driver="torch",
            device=None, progress_bar=fw["progress_bar"]).run()  # fmt: skip


def _native_mmdet(rank: int, world: int, job: dict, run_dir: str) -> None:
    import torch.distributed as dist
    from mmengine.runner import Runner

    from adapters.frameworks import mmdet as ours

    fw = job["cfg"]["framework"]
    cfg = ours._load(ours.config_path(fw["config"]), fw["config"])
    data_root = Path(run_dir) / "data"
    if rank == 0:  # the same synthetic images as ours; a user would point at their own dataset
        ours.write_synthetic_coco(data_root, fw["num_images"], fw["image_size"], fw["seed"])
    ours.use_synthetic_data(cfg, data_root, fw["image_size"])
    ours.short_schedule(cfg, fw["max_iters"])
    cfg.train_dataloader.batch_size = fw["batch_size"]
    cfg.train_dataloader.num_workers = fw["num_workers"]
    cfg.train_dataloader.persistent_workers = False
    cfg.launcher = "pytorch"
    cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
    # mmengine adds device_ids=[LOCAL_RANK] unless told otherwise, which a CPU module refuses.
    cfg.model_wrapper_cfg = {"type": "MMDistributedDataParallel", "device_ids": None, **job["native"]}
    cfg.work_dir = str(Path(run_dir) / "work_dir")
    cfg.randomness = dict(seed=fw["seed"])
    # mmengine's own init_dist calls torch.cuda.set_device, which fails without a GPU: on CPU the group is
    # created first, and mmengine uses it.
    _group(rank, world)
    dist.barrier()  # the other rank reads what rank 0 wrote
    runner = Runner.from_cfg(cfg)
    runner.train()


def _native_nnunet(rank: int, world: int, job: dict, run_dir: str) -> None:
    import json

    import torch
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.nn.parallel import DistributedDataParallel

    fw = job["cfg"]["framework"]
    native = job["native"]

    class CPUTrainer(nnUNetTrainer):
        """The least a CPU run of nnU-Net's trainer needs, and the schedule of the benchmark."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # fmt: skip
            # nnU-Net records __init__'s arguments by their names: the signature stays nnUNetTrainer's.
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.device, self.grad_scaler = torch.device("cpu"), None
            self.enable_deep_supervision = fw["deep_supervision"]
            self.num_epochs = fw["epochs"]
            self.num_iterations_per_epoch = fw["iterations_per_epoch"]
            self.num_val_iterations_per_epoch = fw["val_iterations_per_epoch"]

    trainer_module.DDP = lambda module, device_ids=None, **kw: DistributedDataParallel(module, **kw, **native)
    _group(rank, world)
    folder = Path(os.environ["nnUNet_preprocessed"]) / job["dataset"]
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["configurations"][fw["configuration"]]["batch_size"] = 4
    plans["continue_training"] = False
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = CPUTrainer(plans, fw["configuration"], fw["fold"], dataset_json, device=torch.device("cpu"))
    trainer.run_training()


def _native_transformers(rank: int, world: int, job: dict, run_dir: str) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from adapters.frameworks.hf_parts import SyntheticMLM, tiny_bert

    fw = job["cfg"]["framework"]
    _group(rank, world)
    torch.manual_seed(fw["seed"])
    model = tiny_bert(pooler=fw["pooler"])
    args = TrainingArguments(output_dir=str(Path(run_dir) / "native"), max_steps=fw["max_steps"],
                             per_device_train_batch_size=fw["batch_size"], learning_rate=fw["lr"], seed=fw["seed"],
                             logging_steps=fw["log_every"], report_to="none", use_cpu=True, ddp_backend="gloo",
                             disable_tqdm=True, **fw["args"], **job["native"])  # fmt: skip
    Trainer(model=model, args=args, train_dataset=SyntheticMLM()).train()


def _native_lightning(rank: int, world: int, job: dict, run_dir: str) -> None:
    import lightning.pytorch as pl
    import torch

    from adapters.frameworks.lightning_parts import DemoData, DemoSegmenter

    fw = job["cfg"]["framework"]
    _group(rank, world)  # Lightning finds the group created and uses it
    os.environ["GROUP_RANK"] = "0"  # with RANK, LOCAL_RANK and LOCAL_WORLD_SIZE: torchrun's environment
    torch.manual_seed(fw["seed"])
    module = DemoSegmenter(deep_supervision=fw["deep_supervision"], lr=fw["lr"])
    native = dict(job["native"])
    if "ignore" in native:  # DDP's ignore list, set by hand on the module Lightning wraps
        from adapters.ignorelist import ignore_spellings, match_ignore

        names = ignore_spellings(module, match_ignore(module, native.pop("ignore")))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    data = DemoData(batch_size=fw["batch_size"], seed=fw["seed"])
    trainer = pl.Trainer(accelerator="cpu", devices=world, max_steps=fw["max_steps"], default_root_dir=run_dir,
                         **native)  # fmt: skip
    trainer.fit(module, datamodule=data)


NATIVE = {"fastnlp": _native_fastnlp, "mmdet": _native_mmdet, "nnunet": _native_nnunet,
          "lightning": _native_lightning, "transformers": _native_transformers}  # fmt: skip


def _rank(rank: int, world: int, port: int, n: int, side: str, job: dict, run_dir: str, queue) -> None:
    from vs_handwritten import store_env

    from adapters import threads

    entered = time.perf_counter()
    os.environ.update(store_env(rank, world, port, n))
    threads.apply(threads.plan(0, world, {})[0])
    stamps: list[float] = []
    _stamp_steps(job["framework"], stamps)
    with redirect_stdout(io.StringIO()):
        (_ours if side == "ours" else NATIVE[job["framework"]])(rank, world, job, run_dir)
    if rank == 0:  # start-up: from this process's start of work to its first training step
        queue.put((steady_rate(stamps), stamps[0] - entered))
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit


def one_run(side: str, job: dict, tmp: str, n: int, port: int) -> tuple[float, float]:
    import torch.multiprocessing as mp

    run_dir = os.path.join(tmp, f"{side}_{n}")
    os.makedirs(run_dir, exist_ok=True)
    queue = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_rank, args=(2, port, n, side, job, run_dir, queue), nprocs=2, start_method="spawn",
                               join=False)  # fmt: skip
    result = queue.get()
    procs.join()
    return result


def jobs(framework: str, tmp: str) -> list[dict]:
    from omegaconf import OmegaConf

    from adapters.config import compose, validate

    overrides, rows = SETUPS[framework]
    extra, dataset = [], None
    if framework == "nnunet":  # plan and preprocess the synthetic dataset once, with nnU-Net's own code
        dataset = prepare_nnunet(Path(tmp) / "nnunet", overrides)
        extra = [f"framework.dataset={dataset}"]
    out = []
    for label, preset, native in rows:
        name, *more = preset.split()  # a preset, and maybe overrides of its keys
        checked = validate(compose([*overrides, *extra, *COMMON, f"ddp={name}", *more]))
        cfg = OmegaConf.to_container(checked.cfg, resolve=True, enum_to_str=True)
        cfg = {k: cfg[k] for k in ("framework", "ddp", "launcher", "memory")}
        out.append({"framework": framework, "label": label, "preset": preset, "native": native, "cfg": cfg,
                    "settings": checked.settings(), "dataset": dataset})  # fmt: skip
    return out


def prepare_nnunet(root: Path, overrides: list[str]) -> str:
    from adapters.frameworks import nnunet

    for var in nnunet.FOLDER_VARS:
        os.environ[var] = str(root / var)
    nnunet.write_synthetic_dataset(root / "nnUNet_raw" / nnunet.SYNTHETIC, 12, 64)
    with redirect_stdout(io.StringIO()):
        nnunet.plan_and_preprocess(1, "2d")
    os.environ["nnUNet_n_proc_DA"] = "0"
    return nnunet.SYNTHETIC


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(SETUPS), required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # every run meets here
    rates: dict[tuple[str, str], list[float]] = {}
    starts: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        all_jobs = jobs(args.framework, tmp)
        n = 0
        for r in range(args.rounds):
            for j, job in enumerate(all_jobs):
                for side in ("ours", "native") if (r + j) % 2 == 0 else ("native", "ours"):
                    n += 1
                    rate, start = one_run(side, job, tmp, n, store.port)
                    rates.setdefault((job["label"], side), []).append(rate)
                    starts.setdefault((job["label"], side), []).append(start)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(
        f"framework={args.framework}: 2 ranks, gloo (CPU), {args.rounds} rounds, ours and native in turn, two "
        "fresh processes per run; steady steps/s (from the 2nd step's start to the last's), rank 0.\n"
    )
    print("| framework | comparison | ours steps/s | native steps/s | ours / native, paired (25-75%) | start-up, "
          "ours / native |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for job in all_jobs:
        mine, theirs = rates[(job["label"], "ours")], rates[(job["label"], "native")]
        ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
        low, high = _quartiles(ratios)
        print(
            f"| {args.framework} | {job['label']} (ddp={job['preset']}) | {statistics.median(mine):.2f} | "
            f"{statistics.median(theirs):.2f} | {statistics.median(ratios):.3f}x ({low:.3f}-{high:.3f}) | "
            f"{statistics.median(starts[(job['label'], 'ours')]):.1f} s / "
            f"{statistics.median(starts[(job['label'], 'native')]):.1f} s |"
        )
    print(
        "\nStart-up: from the rank's start of work (the interpreter and this script already loaded) to its first "
        "training step, rank 0, median: imports, building the model and data, the process group, and on our side "
        "ddp=auto's observed first steps and the checks."
    )


if __name__ == "__main__":
    main()
