import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from genserve.artifacts.tokenizer import (
    SPECIAL_TOKEN,
    IncrementalDecoder,
    TextTokenizer,
    UnknownCharactersError,
    train_bpe_tokenizer,
    train_char_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 40,
    "To be, or not to be, that is the question:\n\tWhether 'tis nobler in the mind to suffer\n" * 40,
    "  leading spaces and trailing spaces  \n\n\n" * 20,
]
TRICKY = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "  two leading",
    "two trailing  ",
    "runs    of     spaces",
    "lines\n\nwith\n\n\nblank lines\n",
    "\ttabbed\tout\t",
    "\r\n windows line end",
    "To be, or not to be",
]
UNICODE = [
    "café naïve",
    "an em dash — here",
    "emoji 😀🎉 and ZWJ 👩‍👩‍👧",
    "中文字符 and 日本語",
    "combining é (e + U+0301)",
    "\ufffd replacement char",
    SPECIAL_TOKEN,
    f"text{SPECIAL_TOKEN}inside",
]


@pytest.fixture(scope="module")
def char_tok() -> TextTokenizer:
    return train_char_tokenizer([*CORPUS, "\r"])


@pytest.fixture(scope="module")
def bpe_tok() -> TextTokenizer:
    return train_bpe_tokenizer(CORPUS, vocab_size=400, min_frequency=2)


def _stream(tok: TextTokenizer, ids: list[int]) -> str:
    decoder = tok.incremental_decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    tail = decoder.flush()
    assert decoder.text == pushed + tail
    return pushed + tail


# -- character-level ------------------------------------------------------------------------------------------


def test_char_vocabulary_is_special_then_sorted_characters(char_tok):
    chars = sorted(set("".join(CORPUS)) | {"\r"})
    assert char_tok.kind == "char"
    assert char_tok.vocab_size == len(chars) + 1
    assert char_tok.bos_token_id == char_tok.eos_token_id == 0
    assert char_tok.tokenizer.id_to_token(0) == SPECIAL_TOKEN
    assert [char_tok.tokenizer.id_to_token(i) for i in range(1, char_tok.vocab_size)] == chars
    assert char_tok.encode("".join(chars)) == list(range(1, len(chars) + 1))
    assert char_tok.special_token_ids == {0}


@pytest.mark.parametrize("text", TRICKY)
def test_char_round_trip(char_tok, text):
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text
    # Our fast path is what the library's own encoding gives.
    assert ids == char_tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert _stream(char_tok, ids) == text


def test_char_whitespace_characters_are_their_own_tokens(char_tok):
    for char in (" ", "\n", "\t", "\r"):
        (token_id,) = char_tok.encode(char)
        assert char_tok.token_text(token_id) == char
        assert char_tok.decode([token_id, token_id]) == char * 2


def test_char_unknown_characters_raise_with_a_clear_message(char_tok):
    with pytest.raises(UnknownCharactersError) as info:
        char_tok.encode("fox 😀 and Z")
    message = str(info.value)
    assert "2 unknown characters" in message
    assert "'😀'" in message and "'Z'" in message
    assert f"vocabulary is {char_tok.vocab_size - 1} characters" in message
    assert info.value.characters == sorted(["😀", "Z"])
    assert isinstance(info.value, ValueError)


def test_char_unknown_message_lists_at_most_ten(char_tok):
    text = "".join(chr(0x4E00 + i) for i in range(25))
    with pytest.raises(UnknownCharactersError, match=r"25 unknown characters: .*\(15 more\)"):
        char_tok.encode(text)


def test_char_special_token_text_is_never_the_special_id():
    tok = train_char_tokenizer([SPECIAL_TOKEN + " abc"])
    ids = tok.encode(SPECIAL_TOKEN)
    assert 0 not in ids and len(ids) == len(SPECIAL_TOKEN)
    assert tok.decode(ids) == SPECIAL_TOKEN


def test_char_decode_skips_special_tokens(char_tok):
    ids = char_tok.encode("to be")
    assert char_tok.decode([0, *ids, 0, *ids, 0]) == "to beto be"
    assert char_tok.token_text(0) == SPECIAL_TOKEN
    assert _stream(char_tok, [0, *ids, 0]) == "to be"


def test_char_needs_some_characters():
    with pytest.raises(ValueError, match="no characters"):
        train_char_tokenizer(["", ""])


# -- byte-level BPE -------------------------------------------------------------------------------------------


def test_bpe_special_token_is_id_zero(bpe_tok):
    assert bpe_tok.kind == "bpe"
    assert bpe_tok.tokenizer.token_to_id(SPECIAL_TOKEN) == 0
    assert bpe_tok.bos_token_id == bpe_tok.eos_token_id == 0
    assert bpe_tok.vocab_size == bpe_tok.tokenizer.get_vocab_size(with_added_tokens=True)
    assert 257 < bpe_tok.vocab_size <= 400


@pytest.mark.parametrize("text", TRICKY + UNICODE)
def test_bpe_round_trip(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert bpe_tok.decode(ids) == text
    assert 0 not in ids  # special-token text in the input is plain text
    assert _stream(bpe_tok, ids) == text


@pytest.mark.parametrize("fixture", ["char_tok", "bpe_tok"])
def test_encode_batch_is_encode_of_each(request, fixture):
    tok: TextTokenizer = request.getfixturevalue(fixture)
    texts = TRICKY if tok.kind == "char" else TRICKY + UNICODE
    assert tok.encode_batch(iter(texts)) == [tok.encode(text) for text in texts]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError):
        tok.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]


def test_bpe_merges_shorten_text(bpe_tok):
    text = "To be, or not to be, that is the question:\n"
    ids = bpe_tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2
    assert any(len(bpe_tok.token_text(i)) > 1 for i in ids)


def test_bpe_vocab_size_must_hold_the_bytes():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(CORPUS, vocab_size=200)


def test_bpe_incremental_decoder_holds_back_partial_characters(bpe_tok):
    text = "é—😀中"
    ids = bpe_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # untrained characters: one token per byte
    decoder = bpe_tok.incremental_decoder()
    outputs = [decoder.push(i) for i in ids]
    assert outputs == ["", "é", "", "", "—", "", "", "", "😀", "", "", "中"]
    assert decoder.flush() == ""
    assert decoder.text == text


def test_bpe_incremental_decoder_flushes_an_incomplete_character(bpe_tok):
    ids = bpe_tok.encode("a😀")[:-1]  # cut inside the emoji
    decoder = bpe_tok.incremental_decoder()
    assert "".join(decoder.push(i) for i in ids) == "a"
    assert decoder.flush() == "\ufffd"
    assert decoder.text == bpe_tok.decode(ids) == "a\ufffd"


def test_bpe_incremental_decoder_matches_decode_on_random_ids(bpe_tok):
    # Any id sequence, invalid UTF-8 included: pushes + flush == decode.
    rng = random.Random(0)
    byte_ids = [bpe_tok.tokenizer.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    for _ in range(300):
        n = rng.randint(0, 12)
        ids = [rng.randrange(bpe_tok.vocab_size) for _ in range(n)]
        assert _stream(bpe_tok, ids) == bpe_tok.decode(ids)
        ids = [rng.choice(byte_ids) for _ in range(n)]
        assert _stream(bpe_tok, ids) == bpe_tok.decode(ids)


def test_incremental_decoder_type(bpe_tok, char_tok):
    assert isinstance(bpe_tok.incremental_decoder(), IncrementalDecoder)
    assert isinstance(char_tok.incremental_decoder(), IncrementalDecoder)


# -- serialisation and validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["char_tok", "bpe_tok"])
def test_json_round_trip(request, fixture):
    tok: TextTokenizer = request.getfixturevalue(fixture)
    data = tok.to_json()
    json.loads(data)  # plain tokenizer.json
    for payload in (data, data.encode("utf-8")):
        loaded = TextTokenizer.from_json(payload, tok.kind, tok.bos_token_id, tok.eos_token_id)
        assert loaded.vocab_size == tok.vocab_size
        for text in TRICKY:
            assert loaded.encode(text) == tok.encode(text)
    if tok.kind == "bpe":
        loaded = TextTokenizer.from_json(data, "bpe", 0, 0)
        for text in UNICODE:
            assert loaded.encode(text) == tok.encode(text)


def test_from_json_rejects_a_mismatched_kind(char_tok, bpe_tok):
    with pytest.raises(ValueError, match="byte-level"):
        TextTokenizer.from_json(char_tok.to_json(), "bpe", 0, 0)
    with pytest.raises(ValueError, match="char tokenizer"):
        TextTokenizer.from_json(bpe_tok.to_json(), "char", 0, 0)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        TextTokenizer.from_json(bpe_tok.to_json(), "word", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TextTokenizer.from_json(bpe_tok.to_json(), "bpe", bpe_tok.vocab_size, None)
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        TextTokenizer.from_json("{}", "bpe", 0, 0)


def test_decode_rejects_ids_outside_the_vocabulary(bpe_tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe_tok.decode([1, bpe_tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe_tok.incremental_decoder().push(-1)


def _gpt2_style_json() -> tuple[str, int]:
    """A tokenizer.json laid out like Hugging Face's GPT-2 one: bytes and merges first, <|endoftext|> last,
    merges as "a b" strings, the pre-tokenizer, post-processor and decoder GPT-2 declares."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    eos = len(data["model"]["vocab"])
    data["model"]["vocab"][SPECIAL_TOKEN] = eos
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["model"].update(continuing_subword_prefix="", end_of_word_suffix="", unk_token=None, byte_fallback=False)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["pre_tokenizer"] = byte_level
    data["post_processor"] = {**byte_level, "add_prefix_space": True, "trim_offsets": False}
    data["decoder"] = {**byte_level, "add_prefix_space": True}
    data["added_tokens"] = [
        {
            "id": eos,
            "content": SPECIAL_TOKEN,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": True,
        }
    ]
    return json.dumps(data), eos


def test_gpt2_style_tokenizer_json_loads_and_round_trips():
    data, eos = _gpt2_style_json()
    tok = TextTokenizer.from_json(data, "bpe", eos, eos)
    assert tok.vocab_size == eos + 1
    assert tok.bos_token_id == tok.eos_token_id == eos
    assert tok.special_token_ids == {eos}
    for text in TRICKY + UNICODE:
        ids = tok.encode(text)
        assert eos not in ids
        assert tok.decode(ids) == text
        assert _stream(tok, [*ids, eos]) == text
    ids = tok.encode("To be, or not to be")
    assert len(ids) < len("To be, or not to be")
    assert tok.decode([eos, *ids, eos]) == "To be, or not to be"
