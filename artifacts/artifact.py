"""The artifact: the one contract between training and serving.

    STORE/<name>/<version>/
        manifest.json        format version, kind, name, version, created, input spec, training
                             data and config, evaluation metrics, library versions, and the
                             sha256 and size of every other file
        weights.safetensors  tensors only (never pickle)
        model.onnx           optional ONNX graph of the scoring function
        calibration.json     held-out anomaly-score quantiles and the default threshold
        tokenizer.json       text models: the tokenizer, in the `tokenizers` library's format
        prefill.onnx         text transformers, optional: the prompt step, for ONNX Runtime
        decode.onnx          ... and the one-token step, past keys and values as explicit inputs
        samples.png          image models: a grid of samples drawn at the end of training
        loss_curve.png       gradient-trained models: training and validation loss
        training_log.json    gradient-trained models: the loss history

The writer and the reader live together here so the format has one definition. Loading checks
the format version and every file's hash, and reads each file's bytes once: what was hashed is
exactly what gets parsed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT_VERSION = 1
DensityCapability = Literal["exact", "bound", "none"]
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
CALIBRATION = "calibration.json"
TOKENIZER = "tokenizer.json"
ONNX_PREFILL = "prefill.onnx"  # text models: prompt -> logits, keys, values
ONNX_DECODE = "decode.onnx"  # text models: one token + past keys and values -> logits, new key, value
SAMPLES_PNG = "samples.png"  # image models: a grid of samples
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
DEFAULT_STORE = "./model-store"


class ArtifactError(Exception):
    """An artifact that cannot be used; the message names the file and the problem."""


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class InputSpec(BaseModel):
    """Records: rows of float features, in this order."""

    type: Literal["records"] = "records"
    n_features: int = Field(ge=1)
    feature_names: list[str]
    dtype: Literal["float64"] = "float64"


class TextInputSpec(BaseModel):
    """Text, tokenised by the artifact's tokenizer.json (the `tokenizers` library's format)."""

    type: Literal["text"] = "text"
    tokenizer: Literal["char", "bpe"]
    vocab_size: int = Field(ge=2)
    context_length: int | None = Field(ge=2, description="longest token sequence the model takes; None: no limit")
    bos_token_id: int = Field(ge=0, description="token that starts a text when scoring or when the prompt is empty")
    eos_token_id: int | None = Field(ge=0, description="token that ends generation")


class ImageInputSpec(BaseModel):
    """Grey-level images: integer levels in [0, levels), height x width, one channel."""

    type: Literal["image"] = "image"
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1] = 1
    levels: int = Field(ge=2, description="grey levels; 2 for binarised images")
    n_classes: int = Field(0, ge=0, description="class-conditional models: labels are 0..n_classes-1; 0: none")
    class_names: list[str] | None = Field(None, description="what each label means, by index")


AnyInputSpec = Annotated[InputSpec | TextInputSpec | ImageInputSpec, Field(discriminator="type")]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    kind: str
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=r"^[0-9]+$")
    created: str
    config: dict[str, Any]  # the model's own configuration, enough to rebuild its module
    input: AnyInputSpec
    training: dict[str, Any]
    metrics: dict[str, Any]
    libraries: dict[str, str]
    files: dict[str, FileEntry]
    # What log p(x) the model can give: `exact` (autoregressive models, mixtures, flows), `bound` (a lower bound,
    # as a VAE's ELBO) or `none` (a model that can only sample). Artifacts written before it existed are exact.
    density: DensityCapability = "exact"


@dataclass
class Artifact:
    path: Path
    manifest: Manifest
    contents: dict[str, bytes]  # every file named in the manifest, verified

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def json(self, filename: str) -> Any:
        try:
            return json.loads(self.contents[filename])
        except KeyError:
            raise ArtifactError(f"{self.path}: the manifest lists no {filename}") from None
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{self.path / filename}: not valid JSON ({e})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("genserve", "torch", "numpy", "safetensors", "onnx", "onnxruntime", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def validate_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def store_path(store: str | os.PathLike | None = None) -> Path:
    """The model store: the argument, else $GENSERVE_STORE, else ./model-store."""
    return Path(store or os.environ.get("GENSERVE_STORE") or DEFAULT_STORE)


def versions(store: Path, name: str) -> list[str]:
    """Complete versions of a model, oldest first (a version is complete once it has a manifest)."""
    model_dir = store / name
    if not model_dir.is_dir():
        return []
    found = [p.name for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=int)


def list_models(store: Path) -> dict[str, list[str]]:
    if not store.is_dir():
        return {}
    models = {p.name: versions(store, p.name) for p in sorted(store.iterdir()) if p.is_dir()}
    return {name: v for name, v in models.items() if v}


def resolve(store: Path, name: str, version: str = "latest") -> Path:
    available = versions(store, name)
    if not available:
        raise ArtifactError(f"no model named {name!r} in the store {store}")
    if version == "latest":
        return store / name / available[-1]
    if version not in available:
        raise ArtifactError(f"model {name!r} has no version {version!r}; available: {', '.join(available)}")
    return store / name / version


def write_artifact(
    store: Path,
    *,
    kind: str,
    name: str,
    config: dict[str, Any],
    input_spec: InputSpec | TextInputSpec | ImageInputSpec,
    training: dict[str, Any],
    metrics: dict[str, Any],
    files: dict[str, bytes],
    density: DensityCapability = "exact",
) -> Path:
    """Write a new version of `name` atomically: files go to a temporary directory that is renamed
    into place only when complete, so a reader never sees half an artifact."""
    validate_name(name)
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is written by write_artifact itself")
    model_dir = store / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incomplete-", dir=model_dir))
    try:
        for filename, data in files.items():
            (tmp / filename).write_bytes(data)
        while True:
            # Every numbered directory counts, complete or not, so a damaged one is skipped over.
            taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
            version = str(max(taken, default=0) + 1)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                kind=kind,
                name=name,
                version=version,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                config=config,
                input=input_spec,
                training=training,
                metrics=metrics,
                libraries=library_versions(),
                files={f: FileEntry(sha256=sha256(d), bytes=len(d)) for f, d in files.items()},
                density=density,
            )
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            try:
                tmp.rename(model_dir / version)  # fails if another writer took this version
                return model_dir / version
            except OSError:
                if not (model_dir / version).exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_artifact(path: Path) -> Artifact:
    """Read and verify an artifact directory; raise ArtifactError naming the file and the problem. A file:// or
    s3:// URI of a version directory is store.load_artifact_at's (it fetches into the local cache first)."""
    if "://" in str(path):
        raise ArtifactError(f"{path}: a URI; store.load_artifact_at fetches and loads it")
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        raw = json.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: missing; not an artifact directory") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all
        raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{manifest_path}: cannot be read ({e})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {version!r} is not supported; this genserve reads "
            f"format_version {FORMAT_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{manifest_path}: invalid manifest: {e}") from None
    contents: dict[str, bytes] = {}
    for filename, entry in manifest.files.items():
        file_path = path / filename
        if filename in ("", ".", "..") or Path(filename).name != filename:
            raise ArtifactError(f"{manifest_path}: file entry {filename!r} is not a plain file name")
        try:
            data = file_path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{file_path}: listed in the manifest but missing") from None
        except OSError as e:
            raise ArtifactError(f"{file_path}: cannot be read ({e})") from None
        digest = sha256(data)
        if digest != entry.sha256:
            raise ArtifactError(
                f"{file_path}: sha256 {digest} does not match the manifest's {entry.sha256}; "
                "the file is corrupt or was modified"
            )
        contents[filename] = data
    if WEIGHTS not in contents:
        raise ArtifactError(f"{manifest_path}: lists no {WEIGHTS}")
    return Artifact(path=path, manifest=manifest, contents=contents)


def module_weights(module: Any) -> bytes:
    """A torch module's state as safetensors bytes. Tied parameters (GPT's lm_head and wte)
    share storage, which safetensors refuses; each storage is saved once, under its first name."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for key, tensor in module.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        tensors[key] = tensor.detach().contiguous().cpu()
    return save(tensors)


def load_module_weights(module: Any, data: bytes, source: Path | str = WEIGHTS) -> None:
    """Load safetensors bytes written by `module_weights` into a module built from the manifest's
    config; anything missing (other than a tied alias), extra or of the wrong shape is an
    ArtifactError naming `source`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as e:
        raise ArtifactError(f"{source}: not a valid safetensors file ({e})") from None
    state = module.state_dict()
    aliases = {}
    for key, tensor in state.items():
        for other, t in state.items():
            if other != key and other in tensors and t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape:
                aliases[key] = other
    missing = [k for k in state if k not in tensors and k not in aliases]
    extra = [k for k in tensors if k not in state]
    if missing or extra:
        raise ArtifactError(f"{source}: does not fit the manifest's config (missing {missing[:5]}, "
                            f"unexpected {extra[:5]})")
    try:
        module.load_state_dict({**{k: tensors[a] for k, a in aliases.items() if k not in tensors}, **tensors})
    except RuntimeError as e:
        raise ArtifactError(f"{source}: does not fit the manifest's config ({e})") from None
