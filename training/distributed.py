"""`genserve train text|pixelcnn|made|nade|fvsbn ... --workers N`: data-parallel training on Ray Train
(TorchTrainer).

Each of the N workers runs the same loop as a local run (`text_pipeline._train_network`, `image_pipeline._fit`),
with `RayTrainRun` in place of `checkpoints.LocalRun`: the training step (the network's forward, or `ImageNLL` for
an image model) is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU, set up by Ray Train), every worker
draws the same global batch from one seeded generator (text windows; an image epoch's permutation and MADE's
ordering) and computes the gradient of its 1/N of it, and the backward pass averages the gradients. So N workers
take the steps of one process with the whole batch, up to the order of floating-point sums: the same validation
loss, each worker doing 1/N of the arithmetic. (An image epoch's last, partial batch is cut to a multiple of N.)

Worker 0 evaluates, logs and writes the checkpoints (the format of a local run, training/checkpoints.py:
safetensors and JSON, never pickle), which Ray Train copies into its storage, `STORE/.checkpoints/ray/NAME/` (a path
every node mounts, or an s3:// URI), keeping the last two; Ray Train's own bookkeeping there is JSON too. If a
worker or its node dies, Ray Train restarts the group from the latest checkpoint (up to `MAX_FAILURES` times);
`--resume` continues a stopped run from it, without it a run starts over. When training ends, this process loads
the final weights (an image model: its best epoch's) from the last checkpoint, then evaluates and exports as a
local run does. Image runs draw no sample grids during training (worker 0 may be on another machine).

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

from genserve.artifacts import artifact
from genserve.training.checkpoints import MODEL, read_checkpoint

CHECKPOINT = "checkpoint"  # our checkpoint directory inside each Ray Train checkpoint
MAX_FAILURES = 2  # restarts from the latest checkpoint after a worker or node is lost


class RayTrainRun:
    """`text_pipeline.LocalRun` for one Ray Train worker."""

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


def _text_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one worker's share of a text run."""
    import ray.train.torch

    from genserve.training import text_pipeline as tp
    from genserve.training.runs import threads_for

    cfg, data = config["cfg"], config["data"]
    saved, saved_files = _worker_checkpoint()
    device = ray.train.torch.get_device()
    with threads_for(device, cfg.threads):
        tp._train_network(cfg, data, device, RayTrainRun(), saved, saved_files, progress=False)


def _image_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one worker's share of an image run (no sample grids on the way)."""
    import ray.train.torch

    from genserve.training import image_pipeline as ip
    from genserve.training.runs import threads_for

    cfg, data, train = config["cfg"], config["data"], config["train"]
    saved, saved_files = _worker_checkpoint()
    device = ray.train.torch.get_device()
    with threads_for(device, cfg.threads):
        model = ip.image_module(cfg, data, train, device)
        ip._fit(cfg, model, data, train, device, None, False, RayTrainRun(), saved, saved_files)


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


def _fit(worker: Callable[[dict[str, Any]], None], config: dict[str, Any], cfg: Any, storage: str,
         resume: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run `worker` on `cfg.workers` Ray Train workers; the state and files of the run's last checkpoint."""
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
        worker,
        train_loop_config=config,  # through Ray's object store, in memory
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
        return read_checkpoint(Path(directory) / CHECKPOINT)


def train_text_data_parallel(cfg: Any, data: Any, device: torch.device, storage: str,
                             resume: bool) -> tuple[nn.Module, dict[str, Any], float]:
    """Train `cfg`'s network on `cfg.workers` Ray Train workers; the trained module on `device`, its history and
    the training seconds, as `text_pipeline._train_network` returns them."""
    from genserve.training.text_pipeline import build_module

    saved, files = _fit(_text_worker, {"cfg": cfg, "data": data}, cfg, storage, resume)
    module = build_module(cfg, data.tokenizer.vocab_size).to(device)
    artifact.load_module_weights(module, files[MODEL], f"checkpoint {MODEL}")
    history = saved["history"]
    history["workers"] = cfg.workers
    return module, history, history["training_seconds"]


def train_image_data_parallel(cfg: Any, data: Any, train: Any, device: torch.device, storage: str,
                              resume: bool) -> tuple[nn.Module, dict[str, Any], float]:
    """Train an image model on `cfg.workers` Ray Train workers; the module with its best epoch's weights, on
    `device`, its history and the training seconds, as `image_pipeline._fit` returns them."""
    from genserve.training.image_pipeline import BEST, image_module

    saved, files = _fit(_image_worker, {"cfg": cfg, "data": data, "train": train}, cfg, storage, resume)
    module = image_module(cfg, data, train, device)
    artifact.load_module_weights(module, files[BEST], f"checkpoint {BEST}")
    history = saved["history"]
    history["workers"] = cfg.workers
    return module, history, history["training_seconds"]
