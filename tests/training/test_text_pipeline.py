"""`train_text` end to end on a small synthetic corpus (tiny preset): every model kind, both tokenizers, exact
whole-stream evaluation, checkpoint and resume, and the `genserve train text` command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

import genserve.training.text_pipeline as tp
from genserve.artifacts import artifact as art
from genserve.artifacts.neighbours import NEIGHBOURS_CONFIG, NEIGHBOURS_WEIGHTS
from genserve.artifacts.reference import REFERENCE_CONFIG, REFERENCE_WEIGHTS
from genserve.models.lm import sequence_log_probs
from genserve.service.cli import app
from genserve.service.local import LocalScorer
from genserve.service.text_runtime import load_text_model
from genserve.training.checkpoints import checkpoint_dir
from genserve.training.reporting import LOSS_CURVE, TRAINING_LOG
from genserve.training.text_pipeline import TextTrainConfig, train_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = ("validation_nll_nats_per_token", "validation_bits_per_char", "train_loss", "parameters",
           "training_seconds", "tokens_seen", "iterations")


def write_corpus(path: Path, lines: int = 700, seed: int = 0) -> Path:
    """Sentences from a tiny grammar: learnable, about 17k characters of 25 distinct ones."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my lord", "the king", "sweet juliet", "good romeo"]
    verbs = ["sees", "loves", "finds", "calls", "fears"]
    objects = ["the moon", "a rose", "his sword", "the sea", "her ring"]
    text = "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n" for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "grammar.txt")


def tiny(corpus: Path, name: str, **overrides) -> TextTrainConfig:
    settings = dict(name=name, dataset=str(corpus), preset="tiny", export_onnx=False)
    return TextTrainConfig(**{**settings, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors((path / art.WEIGHTS).read_bytes())


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, Path]:
    """One tiny run of each kind, 20 iterations; the GPT with its ONNX graphs."""
    store = tmp_path_factory.mktemp("store")
    return {model: train_text(tiny(corpus, f"grammar-{model}", model=model, max_iters=20, export_onnx=model == "gpt"),
                              store, progress=False)
            for model in ("gpt", "lstm", "ngram")}


@pytest.mark.parametrize("model", ["gpt", "lstm", "ngram"])
def test_each_model_kind_trains_and_loads(corpus, trained, model):
    loaded = load_text_model(trained[model], runtime="torch", device="cpu")
    manifest = loaded.artifact.manifest
    assert manifest.kind == model
    expected_files = {art.WEIGHTS, art.TOKENIZER, LOSS_CURVE, TRAINING_LOG, art.CALIBRATION,
                      REFERENCE_WEIGHTS, REFERENCE_CONFIG}
    if model == "gpt":
        expected_files |= {art.ONNX_PREFILL, art.ONNX_DECODE}
        assert manifest.metrics["onnx_max_abs_error"] < 1e-4
    if model != "ngram":  # the knn score's index of training lines in the model's hidden-state space
        expected_files |= {NEIGHBOURS_WEIGHTS, NEIGHBOURS_CONFIG}
    assert set(manifest.files) == expected_files

    spec = manifest.input
    vocab = loaded.tokenizer.vocab_size
    assert spec.tokenizer == "char" and spec.vocab_size == vocab == 1 + len(set(corpus.read_text()))
    assert spec.bos_token_id == spec.eos_token_id == 0
    assert spec.context_length == (manifest.config["context_length"] if model == "gpt" else None)

    m = manifest.metrics
    for field in METRICS:
        assert field in m, field
    assert math.isfinite(m["validation_bits_per_char"])
    assert 0 < m["validation_bits_per_char"] < math.log2(vocab)  # learnt something: better than uniform
    # One character per token, and one EOS after the single validation document.
    assert m["validation_tokens"] == m["validation_characters"] + 1
    ratio = m["validation_nll_nats_per_token"] * m["validation_tokens"] / (m["validation_characters"] * math.log(2))
    assert m["validation_bits_per_char"] == pytest.approx(ratio)
    assert m["parameters"] > 0 and m["training_seconds"] >= 0 and math.isfinite(m["train_loss"])
    if model == "ngram":
        assert m["iterations"] == 0 and m["tokens_seen"] == manifest.training["data"]["train_tokens"]
        assert manifest.config["order"] == 3
    else:
        s = manifest.training["settings"]
        assert m["iterations"] == s["max_iters"] == 20
        assert m["tokens_seen"] == 20 * s["batch_size"] * s["context_length"]

    assert loaded.artifact.contents[LOSS_CURVE].startswith(PNG_SIGNATURE)
    log = json.loads(loaded.artifact.contents[TRAINING_LOG])
    if model == "ngram":
        assert [row["order"] for row in log["by_order"]] == [1, 2, 3]
    else:
        assert [e["iter"] for e in log["evaluations"]] == [10, 20]
        assert len(log["train"]) == 20
    data = manifest.training["data"]
    assert data["dataset"] == str(corpus) and data["tokenizer"] == "char"
    assert data["train_characters"] + data["validation_characters"] == len(corpus.read_text())

    # The served model scores text the way training measured it.
    text = "the king loves the sea.\n"
    ids = torch.tensor([[spec.bos_token_id, *loaded.tokenizer.encode(text)]])
    logp = sequence_log_probs(loaded.scorer, ids)
    assert logp.shape == (1, len(text)) and bool(torch.isfinite(logp).all())
    assert -float(logp.detach().mean()) < math.log(vocab)


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_text_knn_is_the_distance_of_the_mean_hidden_state_to_the_training_lines(corpus, trained, model):
    scorer = LocalScorer(trained[model])
    index, tokenizer = scorer.neighbours, scorer.tokenizer
    training_lines = sorted({line for line in corpus.read_text().splitlines() if line})
    assert index is not None and index.space == "standardised"
    assert len(index.features) == index.n_train <= len(training_lines)  # distinct training lines, deduplicated
    texts = ["the king loves the sea."]
    raw = scorer.scores(texts=texts)
    token_lists = [[tokenizer.bos_token_id, *tokenizer.encode(t)] for t in texts]
    with torch.no_grad():  # the definition: the k-th nearest standardised training line's mean hidden state
        hidden = scorer._model.scorer.hidden_states(torch.tensor(token_lists))[0, 1:].double().mean(0).numpy()
    query = (hidden - index.mean) / index.scale
    distances = np.sort(np.linalg.norm(index.features.astype(np.float64) - query, axis=1))
    assert raw["knn"][0] == pytest.approx(distances[min(index.k, len(distances)) - 1], rel=1e-4)
    cals = scorer.calibrations
    assert cals.default == "ensemble" and cals.primary() == ["bits_per_char"]
    assert {"knn", "ensemble"} <= set(cals.names()) and {"knn", "ensemble"} <= set(cals.names(per_line=True))
    assert scorer.anomaly(texts=texts, per_line=True, score="knn").score_type == "knn"


def test_bpe_tokenizer(corpus, tmp_path):
    path = train_text(tiny(corpus, "grammar-bpe", tokenizer="bpe", bpe_vocab_size=300), tmp_path, progress=False)
    loaded = load_text_model(path, runtime="torch", device="cpu")
    m, spec = loaded.artifact.manifest.metrics, loaded.artifact.manifest.input
    assert spec.tokenizer == "bpe" and spec.vocab_size == loaded.tokenizer.vocab_size <= 300
    assert m["validation_tokens"] < m["validation_characters"]  # merges: fewer tokens than characters
    assert 0 < m["validation_bits_per_char"] < 8  # bytes are the fallback alphabet: uniform is 8 bits/byte


def test_resume_gives_the_same_weights(corpus, trained, tmp_path):
    straight = trained["gpt"]  # 20 iterations in one run
    # Stopped at 10 (the schedule is that of 20 iterations), then resumed to 20.
    train_text(tiny(corpus, "resumed", max_iters=10, lr_decay_iters=20), tmp_path, progress=False)
    checkpoint = checkpoint_dir(tmp_path, "resumed")
    assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["iteration"] == 10
    assert any(k.endswith(".exp_avg") for k in load_safetensors((checkpoint / "optimizer.safetensors").read_bytes()))
    resumed = train_text(tiny(corpus, "resumed", max_iters=20, resume=True), tmp_path, progress=False)
    assert resumed.parent.name == "resumed" and resumed.name == "2"  # the interrupted run wrote version 1

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = json.loads((resumed / TRAINING_LOG).read_text())
    assert log["resumed_at"] == [10] and len(log["train"]) == 20
    assert json.loads((straight / TRAINING_LOG).read_text())["train"] == log["train"]
    # The store lists the models, never the checkpoints beside them.
    assert set(art.list_models(tmp_path)) == {"resumed"}


def test_resume_refuses_another_configuration(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_text(tiny(corpus, "nothing-yet", resume=True), tmp_path, progress=False)
    train_text(tiny(corpus, "run", max_iters=3, eval_iters=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"learning_rate \(checkpoint 0.003, now 0.001\)"):
        train_text(tiny(corpus, "run", max_iters=20, lr_decay_iters=3, learning_rate=1e-3, resume=True),
                   tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr_decay_iters"):  # by default the schedule follows max_iters
        train_text(tiny(corpus, "run", max_iters=20, resume=True), tmp_path, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        train_text(tiny(corpus, "run", model="ngram", resume=True), tmp_path, progress=False)


def test_transformer_windows_score_every_token_once():
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 5), None

    for n in (2, 9, 10, 11, 57, 100):
        stream = torch.randint(0, 5, (n,))
        for context in (2, 3, 8, 16):
            total, scored = tp.transformer_stream_nll(Uniform(), stream, context, batch=3)
            assert scored == n - 1
            assert total == pytest.approx((n - 1) * math.log(5))


def test_whole_stream_scores_match_a_single_pass():
    from genserve.models.gpt import GPT, GPTConfig
    from genserve.models.lstm import CharLSTM, LSTMConfig
    from genserve.models.ngram import NGramConfig, NGramLM

    torch.manual_seed(0)
    stream = torch.randint(0, 7, (40,))
    gpt = GPT(GPTConfig(vocab_size=7, context_length=64, n_layer=1, n_head=2, n_embd=16)).eval()
    lstm = CharLSTM(LSTMConfig(vocab_size=7, n_embd=8, hidden_size=16, n_layer=2)).eval()
    ngram = NGramLM.fit(stream, NGramConfig(vocab_size=7, order=3)).eval()
    with torch.no_grad():
        for model, score in ((gpt, lambda m: tp.transformer_stream_nll(m, stream, 64)),
                             (lstm, lambda m: tp.lstm_stream_nll(m, stream, segments=1, chunk=7)),
                             (ngram, lambda m: tp.ngram_stream_nll(m, stream, chunk=6))):
            want = -float(sequence_log_probs(model, stream[None]).double().sum())
            total, scored = score(model)
            assert scored == 39
            assert total == pytest.approx(want, rel=1e-5), type(model).__name__


def test_two_real_plays(tmp_path, monkeypatch):
    plays = tp.load_shakespeare()
    monkeypatch.setattr(tp, "load_shakespeare", lambda: {k: plays[k] for k in ("macbeth", "king-john")})
    monkeypatch.setattr(tp, "VALIDATION_PLAYS", ("macbeth",))
    path = train_text(TextTrainConfig(name="bard", preset="tiny", model="ngram"), tmp_path, progress=False)
    manifest = art.load_artifact(path).manifest
    data = manifest.training["data"]
    assert data["dataset"] == "shakespeare" and data["split"] == "by play"
    assert data["train_plays"] == ["king-john"] and data["validation_plays"] == ["macbeth"]
    assert data["validation_characters"] == len(plays["macbeth"])
    assert 1.5 < manifest.metrics["validation_bits_per_char"] < 4.5


def test_cli_trains_and_rejects_bad_options(corpus, tmp_path):
    runner = CliRunner()
    base = ["train", "text", "--dataset", str(corpus), "--store", str(tmp_path), "--preset", "tiny", "--no-onnx"]
    result = runner.invoke(app, [*base, "--name", "cli", "--max-iters", "5", "--n-embd", "16", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "bits/char" in result.output and str(tmp_path / "cli" / "1") in result.output
    settings = art.load_artifact(tmp_path / "cli" / "1").manifest.training["settings"]
    assert (settings["max_iters"], settings["n_embd"], settings["batch_size"], settings["n_layer"]) == (5, 16, 4, 1)

    for bad in (["--model", "rnn"], ["--tokenizer", "words"], ["--preset", "huge"], ["--n-head", "3"],
                ["--dataset", str(tmp_path / "missing.txt")], ["--max-iters", "0"], ["--resume"]):
        result = runner.invoke(app, [*base, "--name", "bad", *bad])
        assert result.exit_code == 2, (bad, result.output)
    result = runner.invoke(app, [*base, "--name", "Bad Name"])
    assert result.exit_code == 2 and "invalid model name" in result.output
