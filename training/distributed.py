"""`genserve train text|pixelcnn|made|nade|fvsbn ... --workers N`: data-parallel training on Ray Train
(TorchTrainer).

Each of the N workers runs the same loop as a local run, with `RayTrainRun` in place of `checkpoints.LocalRun`:
the pipeline hands `fit_data_parallel` its worker function (text_pipeline's `train_network`, image_pipeline's
`fit_on_worker`), so this module imports no pipeline. There the training step (the network's forward, or
`ImageNLL` for an image model) is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU, set up by Ray
Train), every worker draws the same global batch from one seeded generator (text windows; an image epoch's
permutation and MADE's ordering) and computes the gradient of its 1/N of it, and the backward pass averages the
gradients. So N workers take the steps of one process with the whole batch, up to the order of floating-point
sums: the same validation loss, each worker doing 1/N of the arithmetic. (An image epoch's last, partial batch is
cut to a multiple of N.)

Worker 0 evaluates, logs and writes the checkpoints (the format of a local run, training/checkpoints.py:
safetensors and JSON, never pickle), which Ray Train copies into its storage, `STORE/.checkpoints/ray/NAME/` (a path
every node mounts, or an s3:// URI), keeping the last two; Ray Train's own bookkeeping there is JSON too. If a
worker or its node dies, Ray Train restarts the group from the latest checkpoint (up to `MAX_FAILURES` times);
`--resume` continues a stopped run from it, without it a run starts over. When training ends, this process loads
the final weights (an image model: its best epoch's) from the last checkpoint, then evaluates and exports as a
local run does (the pipeline builds the module from the checkpoint's files). Image runs draw no sample grids
during training (worker 0 may be on another machine).

Ray: the cluster of $RAY_ADDRESS (a RayJob sets it; machines joined by `ray start`: `RAY_ADDRESS=auto`), else a
local Ray started for the run. Each worker asks for one CPU (and one GPU with `--device cuda`, or by default when
the cluster has a GPU per worker).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genserve.training.checkpoints import checkpoint_dir, read_checkpoint
from genserve.training.loop import FamilyRun, threads_for

CHECKPOINT = "checkpoint"  # our checkpoint directory inside each Ray Train checkpoint
MAX_FAILURES = 2  # restarts from the latest checkpoint after a worker or node is lost


class RayTrainRun:
    """`checkpoints.LocalRun` for one Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.chief = self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # DistributedDataParallel when there are several workers; the parameters stay on the device they are on.
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def shard(self, *batch: Tensor | None) -> tuple[Tensor | None, ...]:
        # Equal shares: the callers make every global batch a multiple of the number of workers.
        return tuple(None if t is None else t.chunk(self.world)[self.rank] for t in batch)

    def mean(self, value: Tensor) -> Tensor:
        if self.world == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value / self.world

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        import ray.train

        # Every worker reports (Ray Train waits for all of them); worker 0's report carries the checkpoint.
        if not self.chief:
            ray.train.report(metrics)
            return "the run's Ray Train storage"
        with tempfile.TemporaryDirectory(prefix="genserve-checkpoint-") as tmp:
            write(Path(tmp) / CHECKPOINT)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        context = ray.train.get_context()
        return f"{context.get_storage().experiment_fs_path}"


def _worker_checkpoint() -> tuple[dict[str, Any] | None, dict[str, bytes] | None]:
    """The latest checkpoint of this run (on --resume, or after a restart), as `read_checkpoint` gives it."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as directory:
        return read_checkpoint(Path(directory) / CHECKPOINT)


# A pipeline's share of one worker's run: (device, run, checkpoint state, checkpoint files) -> anything. The pipeline
# defines it (the loop of a local run, given `RayTrainRun` for `run`); it travels to the workers pickled, so it is
# a module-level function or a functools.partial of one.
Worker = Callable[[torch.device, "RayTrainRun", dict[str, Any] | None, dict[str, bytes] | None], object]


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: the worker's device and threads, the run's latest checkpoint, then the
    pipeline's worker function."""
    import ray.train.torch

    saved, saved_files = _worker_checkpoint()
    device = ray.train.torch.get_device()
    with threads_for(device, config["threads"]):
        config["worker"](device, RayTrainRun(), saved, saved_files)


def _experiment(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def latest_checkpoint(storage: str, name: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(state.json, files) of the latest checkpoint Ray Train kept for run `name` under `storage`."""
    from ray.train import Result

    try:
        checkpoint = Result.from_path(_experiment(storage, name)).checkpoint  # reads Ray Train's JSON snapshot
    except RuntimeError:
        checkpoint = None
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {_experiment(storage, name)}")
    with checkpoint.as_directory() as directory:
        return read_checkpoint(Path(directory) / CHECKPOINT)


def _delete_run(storage: str, name: str) -> None:
    """Forget an earlier run of the same name, so this one starts over instead of Ray Train resuming it."""
    import pyarrow.fs as pafs

    from genserve.artifacts.store import is_remote

    uri = _experiment(storage, name)
    fs, path = pafs.FileSystem.from_uri(uri if is_remote(uri) else Path(uri).resolve().as_uri())
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _connect_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:  # a Ray of our own for this run ("local": not one that `ray start` left running), without a dashboard
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


class CheckpointedRun(FamilyRun):
    """A family's run that checkpoints as it trains, in this process or on Ray Train workers, and may resume."""

    def __init__(self, cfg: Any, store: Path, device: torch.device, progress: bool, checkpoints: str) -> None:
        super().__init__(cfg, store, device, progress)
        self.checkpoints = checkpoints  # Ray Train's storage, for a distributed run
        self.saved: dict[str, Any] | None = None
        self.saved_files: dict[str, bytes] | None = None

    def read_saved(self) -> None:
        """The checkpoint --resume continues: Ray Train's latest for a distributed run, else the local run's in the
        store."""
        cfg = self.cfg
        if cfg.workers:
            self.saved, self.saved_files = latest_checkpoint(self.checkpoints, cfg.name)
        else:
            self.saved, self.saved_files = read_checkpoint(checkpoint_dir(self.store, cfg.name))


def fit_data_parallel(worker: Worker, cfg: Any, storage: str, resume: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run `worker` on `cfg.workers` Ray Train workers (`cfg` names the run and gives its device and threads);
    the history of the run's last checkpoint (with `workers` added) and the checkpoint's files."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _connect_ray()
    if cfg.device:
        use_gpu = torch.device(cfg.device).type == "cuda"
    else:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.workers
    if not resume:
        _delete_run(storage, cfg.name)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"worker": worker, "threads": cfg.threads},  # through Ray's object store, in memory
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: say what failed in the workers
        raise RuntimeError(f"distributed training of {cfg.name!r} failed: {e}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"distributed training of {cfg.name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved, files = read_checkpoint(Path(directory) / CHECKPOINT)
    history = saved["history"]
    history["workers"] = cfg.workers
    return history, files
