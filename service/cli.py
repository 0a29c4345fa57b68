"""The `genserve` command: train models into the store, list them, and serve them on Ray Serve."""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from genserve.artifacts import artifact as art
from genserve.artifacts.store import LocalStore, open_store

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="genserve: exact-likelihood generative models, trained and served on Ray Serve.")
train_app = typer.Typer(no_args_is_help=True, help="Fit a model and write it to the store as a new artifact version.")
app.add_typer(train_app, name="train")
import_app = typer.Typer(no_args_is_help=True, help="Import a pretrained model as a new artifact version.")
app.add_typer(import_app, name="import")

StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="model store: a directory, file:///path or s3://bucket/prefix [default: "
                                 "$GENSERVE_STORE or ./model-store]"),
]

# What `genserve serve` trains on first run, each one that is missing from the store: minutes at
# at most on 2 CPU cores (the Shakespeare transformer and the MNIST PixelCNN take most of it).
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "breast-cancer": {"kind": "gmm", "dataset": "sklearn:breast_cancer", "covariance_type": "full"},
    "wine": {"kind": "gmm", "dataset": "sklearn:wine", "covariance_type": "full"},
    "shakespeare": {"kind": "text", "dataset": "shakespeare", "tokenizer": "char", "model": "gpt",
                    "preset": "default"},
    "mnist": {"kind": "image", "model": "pixelcnn", "dataset": "mnist5k", "conditional": True, "preset": "default"},
    "digits": {"kind": "image", "model": "made", "dataset": "digits", "conditional": False, "preset": "default"},
}


@train_app.command("gmm")
def train_gmm_command(
    dataset: Annotated[str, typer.Option(help="sklearn:NAME (breast_cancer, wine, iris, digits, ...) or FILE.csv")],
    name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
    store: StoreOption = None,
    components: Annotated[str, typer.Option(help="number of mixture components, or 'auto' to choose by BIC")] = "auto",
    max_components: Annotated[int, typer.Option(help="largest number tried with --components auto")] = 8,
    covariance: Annotated[str, typer.Option(help="full or diag")] = "full",
    reg_covar: Annotated[float, typer.Option(help="covariance floor (MAP prior strength), standardised units")] = 1e-2,
    max_iter: Annotated[int, typer.Option(help="EM iterations at most")] = 200,
    tol: Annotated[float, typer.Option(help="stop when the objective changes by less than this, relatively")] = 1e-6,
    restarts: Annotated[int, typer.Option(help="EM runs from different k-means++ starts; the best is kept")] = 3,
    validation_fraction: Annotated[float, typer.Option(help="share held out for metrics and calibration")] = 0.2,
    label_column: Annotated[str | None, typer.Option(help="CSV column to drop (a label, an id)")] = None,
    exclude_class: Annotated[list[int] | None, typer.Option(
        help="scikit-learn datasets: leave out the records of this class, repeatable (anomaly detection)")] = None,
    seed: Annotated[int, typer.Option(help="seed for the split and initialisation")] = 0,
    onnx: Annotated[bool, typer.Option(help="also export the scoring function to ONNX")] = True,
) -> None:
    """Gaussian mixture by EM on tabular data, with a held-out calibration for anomaly scoring."""
    from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm

    if covariance not in ("full", "diag"):
        raise typer.BadParameter("use full or diag", param_hint="--covariance")
    if components != "auto" and not (components.isdigit() and int(components) >= 1):
        raise typer.BadParameter("a positive integer or 'auto'", param_hint="--components")
    cfg = GMMTrainConfig(
        dataset=dataset, name=name, components=None if components == "auto" else int(components),
        max_components=max_components, covariance_type=covariance, reg_covar=reg_covar, max_iter=max_iter,
        tol=tol, n_init=restarts, seed=seed, validation_fraction=validation_fraction,
        label_column=label_column, exclude_classes=exclude_class or None, export_onnx=onnx,
    )
    try:
        with writable_store(store) as root:
            path = train_gmm(cfg, root)
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    _print_summary(path)


@contextlib.contextmanager
def writable_store(store: str | None) -> Iterator[Path]:
    """The local directory a training command writes its artifact into: the store itself, or for an object store
    a local mirror whose new versions are uploaded when the command's block ends (artifacts/store.py)."""
    opened = open_store(store)
    try:
        root = opened.begin_writing()
    except OSError as e:
        typer.secho(f"error: store {opened}: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    yield root  # what the block raises propagates, and nothing is uploaded
    try:
        uploaded = opened.finish_writing()
    except (OSError, art.ArtifactError) as e:
        typer.secho(f"error: uploading to {opened}: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    for uri in uploaded:
        typer.echo(f"uploaded to {uri}")


def _print_summary(path: Path) -> None:
    manifest = art.load_artifact(path).manifest
    m = manifest.metrics
    typer.echo(
        f"wrote {path}: {m['n_components']} components ({m['covariance_type']}), "
        f"validation NLL {m['validation_nll_nats']:.3f} nats/record, "
        f"{m['validation_bits_per_dim']:.3f} bits/dim, anomaly threshold {m['anomaly_threshold_nll_nats']:.3f}"
    )


@train_app.command("text")
def train_text_command(
    name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
    dataset: Annotated[str, typer.Option(help="'shakespeare' (split by play) or a UTF-8 .txt file "
                                              "(its last 10% held out)")] = "shakespeare",
    tokenizer: Annotated[str, typer.Option(help="char or bpe (byte-level), trained on the training split")] = "char",
    model: Annotated[str, typer.Option(help="gpt, lstm or ngram")] = "gpt",
    preset: Annotated[str, typer.Option(help="tiny (seconds), default (minutes on CPU) or gpu; the options "
                                             "below override its fields")] = "default",
    store: StoreOption = None,
    max_iters: Annotated[int | None, typer.Option(help="training iterations")] = None,
    batch_size: Annotated[int | None, typer.Option(help="windows per batch")] = None,
    context_length: Annotated[int | None, typer.Option(help="window length (the GPT's context)")] = None,
    n_layer: Annotated[int | None, typer.Option(help="layers (gpt, lstm)")] = None,
    n_head: Annotated[int | None, typer.Option(help="attention heads (gpt)")] = None,
    n_embd: Annotated[int | None, typer.Option(help="embedding width (gpt, lstm)")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="hidden state width (lstm)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (cosine decay to a tenth of it)")] = None,
    lr_decay_iters: Annotated[int | None, typer.Option(help="iteration the decay ends [default: max-iters]")] = None,
    order: Annotated[int | None, typer.Option(help="n-gram order (ngram)")] = None,
    bpe_vocab_size: Annotated[int, typer.Option(help="bpe vocabulary size, bytes and special token included")] = 2048,
    seed: Annotated[int, typer.Option(help="seed for initialisation and batches")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N [default: cuda if available]")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [default: one per core; tiny preset: 1]")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoint of a run with the same settings")] = False,
    onnx: Annotated[bool, typer.Option(help="gpt: also export the prefill and decode graphs")] = True,
    workers: Annotated[int, typer.Option(min=0, help="gpt, lstm: train data-parallel on this many Ray Train "
                                                     "workers (of $RAY_ADDRESS's cluster, else a local Ray); "
                                                     "checkpoints go to STORE/.checkpoints/ray/NAME/")] = 0,
) -> None:
    """A language model on text: GPT, char LSTM or n-gram, with an exact validation NLL in bits per character."""
    from genserve.artifacts.families import TEXT_KINDS
    from genserve.training.text_pipeline import PRESETS, TextTrainConfig, train_text

    for option, value, allowed in (("--tokenizer", tokenizer, ("char", "bpe")), ("--model", model, TEXT_KINDS),
                                   ("--preset", preset, tuple(PRESETS))):
        if value not in allowed:
            raise typer.BadParameter(f"use one of {', '.join(allowed)}", param_hint=option)
    cfg = TextTrainConfig(
        name=name, dataset=dataset, tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, model=model, preset=preset,
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, hidden_size=hidden_size, context_length=context_length,
        order=order, max_iters=max_iters, batch_size=batch_size, learning_rate=lr, lr_decay_iters=lr_decay_iters,
        seed=seed, device=device, threads=threads, resume=resume, export_onnx=onnx, workers=workers,
    )
    try:
        # Ray Train's checkpoints go to the store itself (every worker must reach them), not to a local mirror.
        checkpoints = open_store(store).subpath(".checkpoints", "ray")
        with writable_store(store) as root:
            path = train_text(cfg, root, checkpoints=checkpoints)
    except (ValueError, FileNotFoundError, RuntimeError, art.ArtifactError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        typer.secho(f"interrupted: {e}" if str(e) else "interrupted", fg="yellow", err=True)
        raise typer.Exit(130) from None
    m = art.load_artifact(path).manifest.metrics
    typer.echo(f"wrote {path}: {model}, {m['parameters']:,} parameters, validation "
               f"{m['validation_bits_per_char']:.3f} bits/char ({m['validation_nll_nats_per_token']:.3f} nats/token), "
               f"{m['training_seconds']:.0f} s training")


def _train_image(
    kind: str,
    dataset: str,
    name: str,
    conditional: bool,
    preset: str,
    store: str | None,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    arch: list[str] | None,
    sample_every: int,
    seed: int,
    device: str | None,
    threads: int | None,
    onnx: bool,
    exclude_class: list[int] | None = None,
    schedule_epochs: int | None = None,
    resume: bool = False,
    workers: int = 0,
) -> None:
    from genserve.training.image_pipeline import ImageTrainConfig, train_image

    overrides = _arch_overrides(arch)
    cfg = ImageTrainConfig(model=kind, dataset=dataset, name=name, conditional=conditional, preset=preset,
                           epochs=epochs, batch_size=batch_size, learning_rate=lr, architecture=overrides or None,
                           sample_every=sample_every, seed=seed, device=device, threads=threads, export_onnx=onnx,
                           exclude_classes=exclude_class or None, schedule_epochs=schedule_epochs,
                           resume=resume, workers=workers)
    try:
        checkpoints = open_store(store).subpath(".checkpoints", "ray")  # Ray Train's: where every worker reaches
        with writable_store(store) as root:
            path = train_image(cfg, root, checkpoints=checkpoints)
    except (ValueError, FileNotFoundError, RuntimeError, art.ArtifactError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    m = art.load_artifact(path).manifest.metrics
    typer.echo(f"wrote {path}: {kind}, {m['parameters']:,} parameters, test NLL {m['test_nll_nats']:.2f} nats "
               f"({m['test_bits_per_dim']:.4f} bits/dim), {m['training_seconds']:.0f} s training")


def _arch_overrides(arch: list[str] | None) -> dict[str, Any]:
    """--arch KEY=VALUE options as a dict, the values read as YAML (numbers, and lists such as [512,512])."""
    overrides: dict[str, Any] = {}
    for item in arch or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--arch")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise typer.BadParameter(f"cannot read the value of {item!r}", param_hint="--arch") from None
    return overrides


def _image_command(kind: str, summary: str) -> None:
    def command(
        dataset: Annotated[str, typer.Option(help="mnist5k (28x28, binarised) or digits (8x8, 17 levels)")],
        name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
        conditional: Annotated[bool, typer.Option(help="class-conditional: p(x | label), and exact p(x) by "
                                                       "summing over labels")] = False,
        preset: Annotated[str, typer.Option(help="tiny (seconds), default (minutes on CPU) or gpu; the options "
                                                 "below override it")] = "default",
        store: StoreOption = None,
        epochs: Annotated[int | None, typer.Option(help="passes over the training split")] = None,
        batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
        lr: Annotated[float | None, typer.Option(help="peak learning rate (Adam, cosine decay to a tenth)")] = None,
        arch: Annotated[list[str] | None, typer.Option(help="architecture field as KEY=VALUE, repeatable, e.g. "
                                                            "channels=64 or hidden=[512,512]")] = None,
        sample_every: Annotated[int, typer.Option(help="epochs between sample grids written to "
                                                       "STORE/.training/NAME/ (0: only at the end)")] = 5,
        seed: Annotated[int, typer.Option(help="seed for initialisation, batches and samples")] = 0,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N [default: cuda if available]")] = None,
        threads: Annotated[int | None, typer.Option(help="CPU threads [default: one per core]")] = None,
        onnx: Annotated[bool, typer.Option(help="also export log_prob to ONNX (checked to 1e-4)")] = True,
        exclude_class: Annotated[list[int] | None, typer.Option(help="leave this class out of every split, "
                                                                     "repeatable (anomaly detection; with "
                                                                     "--conditional the other classes are "
                                                                     "renumbered 0.., class_names say which "
                                                                     "is which)")] = None,
        schedule_epochs: Annotated[int | None, typer.Option(help="epochs the learning-rate decay spans "
                                                                 "[default: --epochs]; to stop early and --resume "
                                                                 "later")] = None,
        resume: Annotated[bool, typer.Option(help="continue from the checkpoint of a run with the same "
                                                  "settings")] = False,
        workers: Annotated[int, typer.Option(min=0, help="train data-parallel on this many Ray Train workers (of "
                                                         "$RAY_ADDRESS's cluster, else a local Ray); checkpoints "
                                                         "go to STORE/.checkpoints/ray/NAME/")] = 0,
    ) -> None:
        _train_image(kind, dataset, name, conditional, preset, store, epochs, batch_size, lr, arch, sample_every,
                     seed, device, threads, onnx, exclude_class, schedule_epochs, resume, workers)

    command.__doc__ = summary
    train_app.command(kind)(command)


_image_command("pixelcnn", "Gated PixelCNN (vertical and horizontal stacks, no blind spot) on binarised MNIST or "
                           "digits; test NLL in nats and bits/dim.")
_image_command("made", "MADE, trained order-agnostically over a few orderings and scored as their ensemble.")
_image_command("nade", "NADE: shared hidden weights, all conditionals in one pass.")
_image_command("fvsbn", "Fully visible sigmoid belief network: a logistic regression per pixel (baseline).")


def _records_command(kind: str, summary: str) -> None:
    def command(
        dataset: Annotated[str, typer.Option(help="sklearn:NAME (breast_cancer, wine, iris, digits, ...) or FILE.csv")],
        name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
        store: StoreOption = None,
        epochs: Annotated[int | None, typer.Option(help="passes over the training split at most")] = None,
        batch_size: Annotated[int | None, typer.Option(help="records per batch")] = None,
        lr: Annotated[float | None, typer.Option(help="peak learning rate (Adam, cosine decay to a tenth)")] = None,
        patience: Annotated[int, typer.Option(min=0, help="stop after this many epochs without a better "
                                                          "validation NLL (0: never)")] = 50,
        arch: Annotated[list[str] | None, typer.Option(help="architecture field as KEY=VALUE, repeatable, e.g. "
                                                            "n_layers=12 or hidden=[256,256]")] = None,
        validation_fraction: Annotated[float, typer.Option(help="share held out for metrics and calibration")] = 0.2,
        label_column: Annotated[str | None, typer.Option(help="CSV column to drop (a label, an id)")] = None,
        exclude_class: Annotated[list[int] | None, typer.Option(
            help="scikit-learn datasets: leave out this class, repeatable (anomaly detection)")] = None,
        seed: Annotated[int, typer.Option(help="seed for the split, initialisation and batches")] = 0,
        onnx: Annotated[bool, typer.Option(help="also export log_prob to ONNX (checked against torch)")] = True,
        preset: Annotated[str, typer.Option(help="realnvp on images: tiny (seconds) or default (minutes on "
                                                  "CPU)")] = "default",
    ) -> None:
        from genserve.training.image_data import DATASETS as IMAGE_DATASETS
        from genserve.training.records_pipeline import RecordsTrainConfig, train_records

        if dataset in IMAGE_DATASETS:
            if kind != "realnvp":
                typer.secho(f"error: {kind} trains on records (sklearn:NAME or a CSV file); for images use "
                            "pixelcnn, made, nade, fvsbn, realnvp, vae or gan", fg="red", err=True)
                raise typer.Exit(2)
            _train_image_flow(dataset, name, store, preset, epochs, batch_size, lr, arch, exclude_class, seed)
            return
        cfg = RecordsTrainConfig(model=kind, dataset=dataset, name=name, epochs=epochs, batch_size=batch_size,
                                 learning_rate=lr, patience=patience, architecture=_arch_overrides(arch) or None,
                                 validation_fraction=validation_fraction, label_column=label_column,
                                 exclude_classes=exclude_class or None, seed=seed, export_onnx=onnx)
        try:
            with writable_store(store) as root:
                path = train_records(cfg, root)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        m = art.load_artifact(path).manifest.metrics
        typer.echo(f"wrote {path}: {kind}, {m['parameters']:,} parameters, validation NLL "
                   f"{m['validation_nll_nats']:.3f} nats ({m['validation_bits_per_dim']:.4f} bits/dim), best epoch "
                   f"{m['best_epoch']}, {m['training_seconds']:.0f} s training")

    command.__doc__ = summary
    train_app.command(kind)(command)


def _train_image_flow(dataset: str, name: str, store: str | None, preset: str, epochs: int | None,
                      batch_size: int | None, lr: float | None, arch: list[str] | None,
                      exclude_class: list[int] | None, seed: int) -> None:
    from genserve.training.image_flow_pipeline import ImageFlowTrainConfig, train_image_flow

    cfg = ImageFlowTrainConfig(dataset=dataset, name=name, preset=preset, epochs=epochs, batch_size=batch_size,
                               learning_rate=lr, architecture=_arch_overrides(arch) or None,
                               exclude_classes=exclude_class or None, seed=seed)
    try:
        with writable_store(store) as root:
            path = train_image_flow(cfg, root)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    m = art.load_artifact(path).manifest.metrics
    typer.echo(f"wrote {path}: realnvp on images (density bound: uniform dequantisation), "
               f"{m['parameters']:,} parameters, test {m['test_bits_per_dim']:.4f} bits/dim, "
               f"{m['training_seconds']:.0f} s training")


_records_command("realnvp", "RealNVP normalizing flow: affine couplings over alternating halves of records "
                            "(exact log-likelihood), or, with --dataset mnist5k|digits, checkerboard and channel "
                            "couplings on uniformly dequantised images (a bound on log p(x)).")
_records_command("made-mog", "MADE whose conditionals are mixtures of Gaussians (RNADE-style), for continuous "
                             "records; exact log-likelihood.")


@train_app.command("vae")
def train_vae_command(
    dataset: Annotated[str, typer.Option(help="mnist5k (28x28, binarised) or digits (8x8, 17 levels)")],
    name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
    store: StoreOption = None,
    preset: Annotated[str, typer.Option(help="tiny (seconds) or default (minutes on CPU)")] = "default",
    epochs: Annotated[int | None, typer.Option(help="passes over the training split")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (Adam)")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="epochs over which the KL weight (beta) rises from 0 "
                                                           "to 1")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="architecture field as KEY=VALUE, repeatable: latent_dim, "
                                                        "channels, hidden")] = None,
    score_samples: Annotated[int, typer.Option(min=1, max=1000, help="K of the importance-weighted bound that "
                                                                     "calibrates and serves")] = 16,
    exclude_class: Annotated[list[int] | None, typer.Option(help="leave this class out of every split, "
                                                                 "repeatable (anomaly detection)")] = None,
    seed: Annotated[int, typer.Option(help="seed for initialisation, batches and samples")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N [default: cuda if available]")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [default: one per core]")] = None,
) -> None:
    """Convolutional VAE on binarised MNIST or digits: ELBO with a KL warm-up; test ELBO and importance-weighted
    bounds (K = 1..1000); served with density `bound`."""
    from genserve.training.vae_pipeline import VAETrainConfig, train_vae

    cfg = VAETrainConfig(dataset=dataset, name=name, preset=preset, epochs=epochs, batch_size=batch_size,
                         learning_rate=lr, warmup_epochs=warmup_epochs, architecture=_arch_overrides(arch) or None,
                         score_samples=score_samples, exclude_classes=exclude_class or None, seed=seed,
                         device=device, threads=threads)
    try:
        with writable_store(store) as root:
            path = train_vae(cfg, root)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    m = art.load_artifact(path).manifest.metrics
    bounds = ", ".join(f"K={k} {v:.2f}" for k, v in m["test_importance_weighted_nats"].items())
    typer.echo(f"wrote {path}: vae, {m['parameters']:,} parameters, test ELBO {m['test_elbo_nats']:.2f} nats, "
               f"importance-weighted bounds {bounds}, {m['training_seconds']:.0f} s training")


@train_app.command("gan")
def train_gan_command(
    dataset: Annotated[str, typer.Option(help="mnist5k (28x28, binarised) or digits (8x8, 17 levels)")],
    name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
    store: StoreOption = None,
    conditional: Annotated[bool, typer.Option(help="class-conditional: sample a chosen digit")] = False,
    preset: Annotated[str, typer.Option(help="tiny (seconds), default (minutes on CPU) or gpu")] = "default",
    epochs: Annotated[int | None, typer.Option(help="passes over the training split")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (Adam, betas 0.5 and 0.999)")] = None,
    d_steps: Annotated[int, typer.Option(min=1, help="discriminator updates per generator update")] = 1,
    arch: Annotated[list[str] | None, typer.Option(help="architecture field as KEY=VALUE, repeatable, e.g. "
                                                        "latent_dim=100 or channels=64")] = None,
    sample_every: Annotated[int, typer.Option(help="epochs between sample grids written to "
                                                   "STORE/.training/NAME/ (0: only at the end)")] = 5,
    exclude_class: Annotated[list[int] | None, typer.Option(help="leave this class out of every split, "
                                                                 "repeatable")] = None,
    seed: Annotated[int, typer.Option(help="seed for initialisation, batches and samples")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N [default: cuda if available]")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [default: one per core]")] = None,
) -> None:
    """DCGAN-style GAN with spectral normalisation and the non-saturating loss; served for sampling only
    (density `none`)."""
    from genserve.training.gan_pipeline import GANTrainConfig, train_gan

    cfg = GANTrainConfig(dataset=dataset, name=name, conditional=conditional, preset=preset, epochs=epochs,
                         batch_size=batch_size, learning_rate=lr, d_steps=d_steps,
                         architecture=_arch_overrides(arch) or None, sample_every=sample_every,
                         exclude_classes=exclude_class or None, seed=seed, device=device, threads=threads)
    try:
        with writable_store(store) as root:
            path = train_gan(cfg, root)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    m = art.load_artifact(path).manifest.metrics
    typer.echo(f"wrote {path}: gan, density none (sampling only), {m.get('training_seconds', 0):.0f} s training")


@import_app.command("hf")
def import_hf_command(
    directory: Annotated[Path, typer.Argument(help="local Hugging Face GPT-2 directory (config.json, "
                                                   "model.safetensors, tokenizer.json)")],
    name: Annotated[str, typer.Option(help="model name: lowercase letters, digits, '.', '_', '-'")],
    store: StoreOption = None,
    onnx: Annotated[bool, typer.Option(help="also export the prefill and decode graphs for ONNX Runtime")] = True,
) -> None:
    """A GPT-2 checkpoint saved by Hugging Face transformers (safetensors only; nothing is downloaded)."""
    from genserve.training.hf_import import import_hf_gpt2

    try:
        with writable_store(store) as root:
            path = import_hf_gpt2(directory, name, root, export_onnx=onnx)
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    manifest = art.load_artifact(path).manifest
    c = manifest.config
    typer.echo(f"wrote {path}: gpt, {manifest.metrics['parameters']:,} parameters, {c['n_layer']} layers, "
               f"{c['n_embd']} wide, vocabulary {c['vocab_size']}, context {c['context_length']}"
               f"{', with ONNX graphs' if art.ONNX_DECODE in manifest.files else ''}")


models_app = typer.Typer(help="The models in the store (no subcommand), and managing what a running server serves: "
                         "status, index, load, unload, promote (also a rollback) and split (a canary).",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")
UrlOption = Annotated[str, typer.Option("--url", envvar="GENSERVE_URL", help="the running genserve server")]
KeyOption = Annotated[str | None, typer.Option("--api-key", envvar="GENSERVE_API_KEY", show_default=False,
                                               help="an admin key, when the server has API keys on")]


@models_app.callback()
def list_models_command(ctx: typer.Context, store: StoreOption = None) -> None:
    """List the models and versions in the store."""
    if ctx.invoked_subcommand is not None:
        return
    root = open_store(store)
    try:
        models = root.list_models()
    except (ValueError, art.ArtifactError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not models:
        typer.echo(f"no models in {root}")
    for name, versions in models.items():
        typer.echo(f"{name}\t{', '.join(versions)} (latest {versions[-1]})")


@contextlib.contextmanager
def admin_client(url: str, api_key: str | None) -> Iterator[Any]:
    """A client of the running server; its refusals are printed (exit 1), not raised."""
    import httpx

    from genserve.service.client import GenserveClient, GenserveError

    try:
        with GenserveClient(url, timeout=900.0, api_key=api_key) as client:
            yield client
    except GenserveError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except httpx.HTTPError as e:
        typer.secho(f"error: no genserve server answers at {url}: {e}", fg="red", err=True)
        raise typer.Exit(1) from None


def _print_model(model: Any) -> None:
    split = ", ".join(f"v{v} {w}%" for v, w in model.traffic.items()) or "no traffic"
    typer.echo(f"{model.name}: default {model.default_version or '-'} ({split}; policy {model.version_policy})")
    for v in model.versions:
        typer.echo(f"  v{v.version}\t{v.state}{'  ' + v.reason if v.reason else ''}")


@models_app.command("status")
def models_status_command(url: UrlOption = "http://127.0.0.1:8000", api_key: KeyOption = None) -> None:
    """What the server serves: the control mode, each model's versions, default version and traffic split."""
    with admin_client(url, api_key) as client:
        status = client.management()
    typer.echo(f"control mode {status.control}{'' if status.started else ' (still loading the initial models)'}")
    for model in status.models:
        _print_model(model)


@models_app.command("index")
def models_index_command(url: UrlOption = "http://127.0.0.1:8000", api_key: KeyOption = None) -> None:
    """Every version in the server's store with its state (READY, LOADING, UNLOADING, UNAVAILABLE, UNLOADED)."""
    with admin_client(url, api_key) as client:
        rows = client.repository()
    for row in rows:
        typer.echo(f"{row.name}\tv{row.version}\t{row.state}{'  ' + row.reason if row.reason else ''}")


@models_app.command("load")
def models_load_command(
    name: str, version: Annotated[str | None, typer.Option(help="one version [default: the version policy's]")] = None,
    url: UrlOption = "http://127.0.0.1:8000", api_key: KeyOption = None,
) -> None:
    """Load a model version from the store (explicit control mode); returns once it is READY or has failed."""
    with admin_client(url, api_key) as client:
        _print_model(client.load_model(name, version))


@models_app.command("unload")
def models_unload_command(
    name: str, version: Annotated[str | None, typer.Option(help="one version [default: every loaded one]")] = None,
    url: UrlOption = "http://127.0.0.1:8000", api_key: KeyOption = None,
) -> None:
    """Unload a model (or one version) after its requests in flight finish (explicit control mode)."""
    with admin_client(url, api_key) as client:
        _print_model(client.unload_model(name, version))


@models_app.command("promote")
def models_promote_command(name: str, version: str, url: UrlOption = "http://127.0.0.1:8000",
                           api_key: KeyOption = None) -> None:
    """Make VERSION the default with all the traffic, loading it first if needed: a promotion or a rollback."""
    with admin_client(url, api_key) as client:
        _print_model(client.promote(name, version))


@models_app.command("split")
def models_split_command(
    name: str,
    split: Annotated[list[str], typer.Argument(help="VERSION=PERCENT for each READY version, summing to 100")],
    url: UrlOption = "http://127.0.0.1:8000", api_key: KeyOption = None,
) -> None:
    """Split the model's unversioned traffic between READY versions (a canary): genserve models split m 3=90 4=10."""
    weights: dict[str | int, int] = {}
    for part in split:
        version, _, percent = part.partition("=")
        if not version or not percent.isdigit():
            raise typer.BadParameter(f"{part!r} is not VERSION=PERCENT (e.g. 3=90)", param_hint="SPLIT")
        weights[version] = int(percent)
    with admin_client(url, api_key) as client:
        _print_model(client.set_traffic(name, weights))


@app.command("score")
def score_command(
    input: Annotated[Path, typer.Argument(help="CSV or JSONL file of records, images or texts, any size")],
    model: Annotated[str, typer.Option("--model", help="model name")],
    out: Annotated[Path, typer.Option("--out", help="output file (.csv or .jsonl): one row per input row; "
                                                    "rerunning the same command continues it")],
    url: Annotated[str, typer.Option(help="the genserve server")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(help="API key for a server with keys on [default: "
                                                     "$GENSERVE_API_KEY]", show_default=False)] = None,
    local: Annotated[bool, typer.Option("--local", help="score in this process, from --store, without a "
                                                        "server")] = False,
    store: StoreOption = None,
    score: Annotated[str | None, typer.Option("--score", help="score type, e.g. ensemble, knn, nll, "
                                                              "likelihood_ratio, class_entropy, typicality "
                                                              "[default: the model's]")] = None,
    false_positive_rate: Annotated[float | None, typer.Option(help="flag at this held-out false-positive "
                                                                   "rate")] = None,
    threshold: Annotated[float | None, typer.Option(help="flag scores above this instead")] = None,
    id_column: Annotated[str | None, typer.Option(help="input column (or JSON key) copied to the output's id "
                                                       "column, to join rows back")] = None,
    output_format: Annotated[str | None, typer.Option("--format", help="csv or jsonl [default: from OUT's "
                                                                       "extension]")] = None,
    input_format: Annotated[str | None, typer.Option(help="csv or jsonl [default: from INPUT's "
                                                          "extension]")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="rows per request (at most the server's limit)")] = 512,
    restart: Annotated[bool, typer.Option("--restart", help="discard an existing OUT and start over")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Anomaly scores for every row of a CSV or JSONL file, streamed in chunks; resumable."""
    from genserve.service.file_scorer import ScoreFileError, score_file

    try:
        summary = score_file(input, model, out, url=url, api_key=api_key, local=local, store=store, score=score,
                             threshold=threshold, false_positive_rate=false_positive_rate, id_column=id_column,
                             output_format=output_format, input_format=input_format, chunk_size=chunk_size,
                             restart=restart, progress=not quiet)
    except ScoreFileError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho(f"interrupted; run the same command again to continue {out}", fg="yellow", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary.report())


def train_defaults(store: str | None) -> None:
    """Train each default model the store does not have yet."""
    missing = {n: spec for n, spec in DEFAULT_MODELS.items() if not open_store(store).versions(n)}
    if missing:
        with writable_store(store) as root:
            _train_models(missing, root)


def _train_models(models: dict[str, dict[str, Any]], store: Path) -> None:
    for name, spec in models.items():
        settings = {k: v for k, v in spec.items() if k != "kind"}
        typer.echo(f"training default model {name!r} ({settings['dataset']}) into {store}")
        if spec["kind"] == "gmm":
            from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm

            _print_summary(train_gmm(GMMTrainConfig(name=name, **settings), store))
        elif spec["kind"] == "image":
            from genserve.training.image_pipeline import ImageTrainConfig, train_image

            path = train_image(ImageTrainConfig(name=name, **settings), store)
            metrics = art.load_artifact(path).manifest.metrics
            typer.echo(f"wrote {path}: test NLL {metrics['test_nll_nats']:.2f} nats "
                       f"({metrics['test_bits_per_dim']:.4f} bits/dim)")
        else:
            from genserve.training.text_pipeline import TextTrainConfig, train_text

            path = train_text(TextTrainConfig(name=name, **settings), store)
            metrics = art.load_artifact(path).manifest.metrics
            typer.echo(f"wrote {path}: validation {metrics['validation_bits_per_char']:.3f} bits/char")


APP_IMPORT_PATH = "genserve.service.app:build_app"
APP_NAME = "genserve"  # the Serve application; each model version is an application of its own, genserve--NAME--vN


class ControlMode(str, enum.Enum):
    none = "none"
    explicit = "explicit"
    poll = "poll"


def read_serve_config(path: Path | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(http_options, app args, overrides of the Gateway and ModelRepository deployments) of the genserve app in a
    Serve config file. Options of a deployment named after a model (the layout before live model management)
    move into args.deployments, where they now live."""
    if path is None:
        return {}, {}, {}
    from ray.serve.schema import ServeDeploySchema

    from genserve.service.app import CONTROL_DEPLOYMENTS

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:
        raise typer.BadParameter(f"{path} is not a valid Serve config file: {e}", param_hint="--config") from None
    # "service.app:build_app" is the import path from before genserve became one namespace: configs that name it
    # keep working with `genserve serve` (it only reads their args; Ray is given the current path).
    apps = [a for a in config.applications if a.import_path in (APP_IMPORT_PATH, "service.app:build_app")]
    if len(apps) != 1:
        raise typer.BadParameter(f"{path} must have one application with import_path {APP_IMPORT_PATH}",
                                 param_hint="--config")
    http = config.http_options.model_dump(exclude_unset=True) if config.http_options else {}
    args = dict(apps[0].args or {})
    overrides = {}
    for d in apps[0].deployments:
        options = d.model_dump(exclude_unset=True, exclude={"name"})
        if d.name in CONTROL_DEPLOYMENTS:
            overrides[d.name] = options
        else:
            args.setdefault("deployments", {}).setdefault(d.name, options)
    return http, args, overrides


# Ray Serve's settings for the Ray that `genserve serve` starts itself (its processes inherit this environment); a
# variable already set wins. All but the first are Ray Serve's own throughput settings (a subset of what its
# RAY_SERVE_THROUGHPUT_OPTIMIZED sets, without direct ingress, which moves the HTTP port): the proxy writes its
# access log in blocks of 1000 lines (at once on an error), each replica runs its handlers and its router on its
# main event loop instead of two more threads, and replicas talk gRPC to one another. On 2 cores they served 4-30%
# more log_prob and 50-85% more generate requests per second than Ray Serve's defaults (bench/fixes.md). A cluster
# that `--address` joins keeps its own processes' environment: set these in its pods.
SERVE_ENV = {
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def apply_serve_env() -> None:
    """SERVE_ENV into this process's environment, before Ray Serve is imported (it reads them at import)."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


@app.command("serve")
def serve_command(
    store: StoreOption = None,
    host: Annotated[str | None, typer.Option(help="address to listen on [default: config, else 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default: config, else 8000]")] = None,
    config: Annotated[Path | None, typer.Option(help="Serve config YAML (e.g. deploy/serve/genserve.yaml)")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting Ray locally")] = None,
    train_defaults_: Annotated[bool, typer.Option(
        "--train-defaults/--no-train-defaults",
        help="first train the default models (breast-cancer, wine, shakespeare, mnist, digits) that the store "
             "lacks")] = True,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="require this API key (role admin; repeatable); more keys with roles in "
                          "$GENSERVE_API_KEYS_FILE (see README, API keys)", show_default=False)] = None,
    model_control: Annotated[ControlMode | None, typer.Option(
        help="none: serve what is there at start; explicit: only the admin API (genserve models load/unload/"
             "promote/split) changes it; poll: watch the store, serve each newly published version [default: "
             "config, else none]", show_default=False)] = None,
    poll_interval: Annotated[float | None, typer.Option(
        help="poll mode: seconds between looks at the store [default: config, else 10]", min=0.2,
        show_default=False)] = None,
) -> None:
    """Serve every model in the store (or those the config names) until Ctrl-C or SIGTERM."""
    apply_serve_env()
    import ray
    from ray import serve

    from genserve.service.app import AppArgs, build
    from genserve.service.edge import KeyConfigError, hashed_entries, parse_key_entry

    http, args, overrides = read_serve_config(config)
    if store is not None:
        args["store"] = str(store)
    management = args.setdefault("management", {})
    if model_control is not None:
        management["control"] = model_control.value
    if poll_interval is not None:
        management["poll_interval_s"] = poll_interval
    if api_key:  # as digests: the plain keys go no further than this process
        auth = args.setdefault("auth", {})
        try:
            hashed = [f"sha256:{parse_key_entry(k, '--api-key')[0]} admin" for k in api_key]
        except KeyConfigError as e:
            raise typer.BadParameter(str(e), param_hint="--api-key") from None
        auth["api_keys"] = [*auth.get("api_keys", []), *hashed]
    try:  # a bad keys file fails here, before Ray starts, with the file and line at fault
        hashed_entries(AppArgs.model_validate(args).auth)
    except KeyConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        root = open_store(args.get("store"))
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    # Replicas on every node open the same store: a local one by its absolute path.
    args["store"] = str(root.root.resolve()) if isinstance(root, LocalStore) else root.uri
    if train_defaults_:
        train_defaults(args["store"])
    control = management.get("control", "none")
    if control == "none" and not root.list_models():
        typer.secho(f"error: no models in {root}; train one with `genserve train` (or serve with --model-control "
                    "poll or explicit, to add models later)", fg="red", err=True)
        raise typer.Exit(2)

    ray.init(address=address, namespace="genserve", log_to_driver=False,
             **({} if address else {"include_dashboard": False}))
    # After ray.init, which installs its own SIGTERM handler (a crash dump) in this process.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http_options = {"host": host or http.get("host", "127.0.0.1"), "port": port or http.get("port", 8000)}
        serve.start(http_options=http_options)
        application = build(AppArgs.model_validate(args), overrides)
        serve.run(application, name=APP_NAME, route_prefix="/")
        _report_models(stop)
        typer.echo(f"genserve is serving on http://{http_options['host']}:{http_options['port']} "
                   f"(docs at /docs; model control mode {control}); Ctrl-C stops it")
        while not stop.wait(0.5):
            pass
        typer.echo("stopping genserve")
    finally:
        started = time.perf_counter()
        try:
            if address:  # leave the cluster we joined as we found it: the app and its model versions' apps
                versions = [a for a in serve.status().applications if a.startswith(f"{APP_NAME}--")]
                for name in [APP_NAME, *versions]:
                    serve.delete(name, _blocking=False)
                for name in [APP_NAME, *versions]:
                    serve.delete(name)
                from genserve.service.repository import ServeApps

                ServeApps.forget_routing(APP_NAME)  # the next server starts from each model's newest version
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
        typer.echo(f"stopped in {time.perf_counter() - started:.1f}s")


def _report_models(stop: threading.Event) -> None:
    """Wait until the models served at start are loaded (or failed) and print each one's state."""
    import asyncio

    from ray import serve

    async def started() -> dict[str, Any] | None:
        # In an event loop: with SERVE_ENV's router on the caller's loop, a handle needs one; and the handle is
        # shut down in that loop before it closes (serve.shutdown would otherwise try, in a loop that is gone).
        from ray.serve.context import _get_global_client

        response = serve.get_deployment_handle("ModelRepository", app_name=APP_NAME).wait_started.remote()
        waiting = asyncio.ensure_future(_awaited(response))
        try:
            while not stop.is_set():
                done, _ = await asyncio.wait([waiting], timeout=0.5)
                if done:
                    return waiting.result()
            waiting.cancel()
            return None
        finally:
            await _get_global_client().shutdown_cached_handles_async()

    reply = asyncio.run(started())
    if reply is None:
        return
    if reply.get("error_at_start"):
        typer.secho(f"error: {reply['error_at_start']}", fg="red", err=True)
    for row in reply["ok"]:
        if row["state"] == "READY":
            typer.echo(f"  {row['name']} v{row['version']}: READY")
        elif row["state"] == "UNAVAILABLE":
            typer.secho(f"  {row['name']} v{row['version']}: UNAVAILABLE: {row['reason']}", fg="red", err=True)


async def _awaited(response: Any) -> Any:
    return await response


def main() -> None:
    app()


if __name__ == "__main__":
    main()
