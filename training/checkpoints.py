"""Training checkpoints, shared by the text and image runs, and `LocalRun`, how a run executes in one process.

A checkpoint is a directory: `model.safetensors` (the module), `optimizer.safetensors` (Adam(W)'s per-parameter
tensors, `state.{index}.{name}`), `rng.safetensors` (torch generator states, uint8), `state.json` (the run's own
state: iteration or epoch, configuration, history; the optimizer's steps and hyper-parameters, numpy's RNG state)
and any files the run adds (a text run's tokenizer, an image run's best weights so far). Tensors and JSON only,
never pickle. It is written to a temporary directory beside its place and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from genserve.artifacts import artifact

CHECKPOINTS = ".checkpoints"  # STORE/.checkpoints/NAME/: a local run's checkpoint; .checkpoints/ray/: Ray Train's
STATE = "state.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


def checkpoint_dir(store: Path, name: str) -> Path:
    """Where a run in this process keeps its checkpoint."""
    return store / CHECKPOINTS / name


def ray_storage(store: Path) -> str:
    """Where Ray Train keeps the checkpoints of distributed runs unless told otherwise."""
    return str((store / CHECKPOINTS / "ray").resolve())


class LocalRun:
    """How a training loop runs in one process: the whole batch here, checkpoints into `directory`.
    training/distributed.py has the Ray Train counterpart, with the same members."""

    chief = True  # evaluates, logs and writes checkpoints
    world = 1

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that runs forward and backward (a DistributedDataParallel wrapper elsewhere)."""
        return model

    def shard(self, *batch: Tensor | None) -> tuple[Tensor | None, ...]:
        """This process's share of each tensor of a global batch (None stays None)."""
        return batch

    def mean(self, value: Tensor) -> Tensor:
        """A per-process value averaged over all processes."""
        return value

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        """Write a checkpoint with `write(directory)`; returns where it went."""
        write(self.directory)
        return str(self.directory)


def write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     generators: dict[str, torch.Generator], state: dict[str, Any],
                     files: dict[str, bytes] | None = None) -> None:
    """Atomically replace `directory` with a new checkpoint: written beside it, then renamed into place."""
    opt = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            elif isinstance(value, Tensor):
                scalars.setdefault(str(index), {})[key] = {"value": value.item(), "dtype": str(value.dtype)[6:],
                                                           "device": str(value.device)}
            else:
                scalars.setdefault(str(index), {})[key] = {"value": value}
    rng = {f"generator.{name}": g.get_state() for name, g in generators.items()}
    rng["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    numpy_state = np.random.get_state()
    full_state = {
        **state,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *map(_plain, numpy_state[2:])],
        "torch_version": torch.__version__,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-writing-", dir=directory.parent))
    try:
        (tmp / MODEL).write_bytes(artifact.module_weights(model))
        (tmp / OPTIMIZER).write_bytes(save_safetensors(tensors))
        (tmp / RNG).write_bytes(save_safetensors({k: v.contiguous() for k, v in rng.items()}))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / STATE).write_text(json.dumps(full_state, indent=1) + "\n")
        old = directory.parent / f".{directory.name}-old"
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            directory.rename(old)  # a crash from here to the next rename leaves the previous checkpoint at `old`
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(state.json, every other file's bytes) of the checkpoint in `directory`, or of the one a crash left
    half-replaced."""
    old = directory.parent / f".{directory.name}-old"
    source = directory if (directory / STATE).is_file() else old
    if not (source / STATE).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {directory}")
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file() and p.name != STATE}
    missing = {MODEL, OPTIMIZER, RNG} - set(files)
    if missing:
        raise FileNotFoundError(f"the checkpoint in {source} lacks {', '.join(sorted(missing))}")
    return json.loads((source / STATE).read_text()), files


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], tensors: dict[str, Tensor],
                      device: torch.device) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor.to(device)
    for index, entries in saved["scalars"].items():
        for name, entry in entries.items():
            if "dtype" in entry:
                value: Any = torch.tensor(entry["value"], dtype=getattr(torch, entry["dtype"]))
                if entry["device"] != "cpu":
                    value = value.to(device)
            else:
                value = entry["value"]
            state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_checkpoint(saved: dict[str, Any], files: dict[str, bytes], model: nn.Module,
                       optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                       device: torch.device) -> None:
    """Put the module, optimizer and every random number generator back as the checkpoint has them."""
    artifact.load_module_weights(model, files[MODEL], f"checkpoint {MODEL}")
    restore_optimizer(optimizer, saved["optimizer"], load_safetensors(files[OPTIMIZER]), device)
    rng = load_safetensors(files[RNG])
    for name, g in generators.items():
        g.set_state(rng[f"generator.{name}"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda":
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, keys, pos, has_gauss, cached = saved["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
