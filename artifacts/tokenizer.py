"""Tokenisers for text models, built on the Hugging Face `tokenizers` library.

An artifact stores its tokeniser as `tokenizer.json`, the library's own serialisation
(`TextTokenizer.to_json` / `TextTokenizer.from_json`), so a Hugging Face GPT-2 `tokenizer.json` loads the same way
as ours. Two kinds:

- `"char"`: one token per character. The vocabulary is the special token (id 0) plus every distinct character
  of the training texts, sorted. Stored as a BPE model without merges, no normalizer or pre-tokenizer, and a
  `Fuse` decoder, so decoding concatenates the characters as they are. A character outside the vocabulary is an
  error (`UnknownCharactersError`), never silently mapped or dropped.
- `"bpe"`: byte-level BPE as in GPT-2 (`ByteLevel` pre-tokenizer without prefix space, `ByteLevel` decoder).
  Every string is encodable and decodes back exactly; nothing is ever unknown.

`encode` never adds special tokens, and special-token *text* inside the input (say a literal `<|endoftext|>`)
is encoded as ordinary text, so user input cannot inject an EOS; `decode` skips special tokens.
`decode(encode(text)) == text` for every text the tokeniser can encode.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKEN = "<|endoftext|>"  # BOS and EOS of our own tokenisers, as in GPT-2; always id 0 for them

TokenizerKind = Literal["char", "bpe"]
KINDS: tuple[str, ...] = ("char", "bpe")

_MAX_LISTED_UNKNOWN = 10


class UnknownCharactersError(ValueError):
    """Text holds characters that a character-level tokeniser's vocabulary lacks."""

    def __init__(self, characters: Sequence[str], vocabulary_size: int):
        self.characters = list(characters)
        shown = ", ".join(repr(c) for c in self.characters[:_MAX_LISTED_UNKNOWN])
        more = len(self.characters) - _MAX_LISTED_UNKNOWN
        if more > 0:
            shown += f", ... ({more} more)"
        count = len(self.characters)
        super().__init__(
            f"{count} unknown character{'s' if count != 1 else ''}: {shown}; "
            f"the model's vocabulary is {vocabulary_size} characters"
        )


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the kind and the BOS/EOS ids a text model needs.

    The wrapper owns the tokenizer it is given: it switches on `encode_special_tokens` (special-token text in the
    input is encoded as plain text), a runtime setting that is not part of `tokenizer.json`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        kind: TokenizerKind,
        bos_token_id: int,
        eos_token_id: int | None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        self._tokenizer = tokenizer
        self._kind: TokenizerKind = kind
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, token_id in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if token_id is None and name == "eos_token_id":
                continue
            if not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
                raise ValueError(f"{name} {token_id!r} is outside the vocabulary of {self._vocab_size} tokens")
        self._bos = bos_token_id
        self._eos = eos_token_id
        self._special_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        self._char_ids: dict[str, int] | None = None
        self._chars: frozenset[str] | None = None
        if kind == "char":
            self._char_ids = self._check_char_tokenizer()
            self._chars = frozenset(self._char_ids)
        else:
            self._check_bpe_tokenizer()
        tokenizer.encode_special_tokens = True

    def _check_char_tokenizer(self) -> dict[str, int]:
        tok = self._tokenizer
        if tok.normalizer is not None or tok.pre_tokenizer is not None:
            raise ValueError("a char tokenizer must have no normalizer and no pre-tokenizer")
        if not isinstance(tok.decoder, decoders.Fuse):
            raise ValueError("a char tokenizer must use the Fuse decoder")
        char_ids = {}
        for token, token_id in tok.get_vocab(with_added_tokens=False).items():
            if token_id in self._special_ids:
                continue
            if len(token) != 1:
                raise ValueError(f"a char tokenizer's vocabulary holds the multi-character token {token!r}")
            char_ids[token] = token_id
        return char_ids

    def _check_bpe_tokenizer(self) -> None:
        tok = self._tokenizer
        if not isinstance(tok.model, models.BPE) or not isinstance(tok.decoder, decoders.ByteLevel):
            raise ValueError("a bpe tokenizer must be byte-level: a BPE model with the ByteLevel decoder")
        if tok.normalizer is not None:
            raise ValueError("a bpe tokenizer must have no normalizer (encoding would not be lossless)")

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def kind(self) -> TokenizerKind:
        return self._kind

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def characters(self) -> frozenset[str] | None:
        """The characters a char tokenizer knows (None for bpe: it knows every string)."""
        return self._chars

    # -- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added. Char kind: `UnknownCharactersError` for unknown chars."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        if not text:
            return []
        if self._char_ids is not None:
            # What the library's BPE model without merges does (one id per character), minus its overhead on long
            # texts (~5x slower) and its silent dropping of unknown characters.
            unknown = set(text) - self._chars
            if unknown:
                raise UnknownCharactersError(sorted(unknown), len(self._char_ids))
            char_ids = self._char_ids
            return [char_ids[c] for c in text]
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text; for bpe in parallel (the library's thread pool) and without offset tracking."""
        texts = list(texts)
        if self._char_ids is not None:
            return [self.encode(text) for text in texts]
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, not {type(text).__name__}")
        if not texts:
            return []
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped; the exact inverse of `encode`."""
        ids = self._check_ids(ids)
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (a special token's own text; U+FFFD for a partial UTF-8 character)."""
        (token_id,) = self._check_ids([token_id])
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:10]} are outside the vocabulary of {self._vocab_size} tokens")
        return out

    # -- serialisation ------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The `tokenizer.json` text (the `tokenizers` library's own format)."""
        return self._tokenizer.to_str()

    @classmethod
    def from_json(
        cls,
        data: str | bytes,
        kind: TokenizerKind,
        bos_token_id: int,
        eos_token_id: int | None,
    ) -> TextTokenizer:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        try:
            tokenizer = Tokenizer.from_str(data)
        except Exception as exc:  # the library raises a bare Exception for malformed JSON
            raise ValueError(f"not a valid tokenizer.json: {exc}") from exc
        return cls(tokenizer, kind, bos_token_id, eos_token_id)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(kind={self._kind!r}, vocab_size={self._vocab_size}, "
            f"bos_token_id={self._bos}, eos_token_id={self._eos})"
        )


class IncrementalDecoder:
    """Decodes a stream of token ids one at a time, for streaming generation.

    `push(id)` returns the text this token completes: the concatenation of all pushes followed by `flush()` equals
    `decode(all ids)`. A byte-level token may end inside a UTF-8 character; its bytes are held back until the
    character is complete (UTF-8 decoding is incremental, so each push costs O(token length)). `flush()` returns
    whatever is still held back (an incomplete character becomes U+FFFD, as in `decode`). Special tokens
    produce no text.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._parts: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.kind == "bpe" else None

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        tok = self._tokenizer
        if not 0 <= token_id < tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {tok.vocab_size} tokens")
        if token_id in tok.special_token_ids:
            return ""
        token = tok.tokenizer.id_to_token(token_id)
        if token is None:  # a hole in the vocabulary: decode() yields nothing for it either
            return ""
        text = token if self._utf8 is None else self._utf8.decode(_byte_level_bytes(token))
        if text:
            self._parts.append(text)
        return text

    def flush(self) -> str:
        """Text held back (an incomplete trailing UTF-8 character, as U+FFFD); resets the UTF-8 state."""
        if self._utf8 is None:
            return ""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """Everything returned so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in table.items()}


def _byte_level_bytes(token: str) -> bytes:
    """A token's bytes as the ByteLevel decoder sees them (a token outside the alphabet stands for its own UTF-8)."""
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


# -- training ---------------------------------------------------------------------------------------------------


def train_char_tokenizer(texts: Iterable[str]) -> TextTokenizer:
    """A character-level tokenizer: `SPECIAL_TOKEN` (id 0) plus every distinct character of `texts`, sorted."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise ValueError("no characters to build a vocabulary from")
    vocab = {SPECIAL_TOKEN: 0}
    for char in sorted(chars):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([AddedToken(SPECIAL_TOKEN, special=True, normalized=False)])
    tokenizer.decoder = decoders.Fuse()
    return TextTokenizer(tokenizer, "char", bos_token_id=0, eos_token_id=0)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Byte-level BPE like GPT-2's, trained on `texts`; `vocab_size` counts the 256 bytes and `SPECIAL_TOKEN`."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and {SPECIAL_TOKEN}), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    special_id = tokenizer.token_to_id(SPECIAL_TOKEN)
    if special_id != 0:  # the trainer puts special tokens first; the artifact format relies on it
        raise RuntimeError(f"{SPECIAL_TOKEN} got id {special_id}, expected 0")
    return TextTokenizer(tokenizer, "bpe", bos_token_id=0, eos_token_id=0)
