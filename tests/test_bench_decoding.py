"""bench/decoding.py's quick run: every section, tables of numbers, and genserve's greedy and beam tokens equal to
transformers' on the same weights (no time is asserted: the machine may be busy)."""

import re

import pytest
import torch

pytest.importorskip("transformers")

from bench import decoding  # after the skip: the module imports transformers

SECTIONS = ("## Decoding speed", "## KV cache against recomputation", "## Time to first token", "## Roofline",
            "## KV cache memory")
NUMBER = re.compile(r"^-?\d+(\.\d+)?(x|%|M)?$")


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield decoding.run(quick=True)
    finally:
        torch.set_num_threads(threads)


def tables(markdown: list[str]) -> dict[str, list[dict[str, str]]]:
    """Section heading -> the rows of its table, as {column: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    section, header = "", None
    for line in markdown:
        if line.startswith("## "):
            section, header = line, None
            out[section] = []
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                out[section].append(dict(zip(header, cells, strict=True)))
    return out


def test_quick_run_has_every_section_with_numbers(report):
    found = tables(report.markdown)
    for prefix in SECTIONS:
        (heading,) = [h for h in found if h.startswith(prefix)]
        rows = found[heading]
        assert rows, heading
        for row in rows:
            numbers = [cell for cell in row.values() if NUMBER.match(cell)]
            assert len(numbers) >= 3, (heading, row)
    assert {g.name for g in report.goals} == {"greedy decoding, batch 1", "beam search, 4 beams, batch 1",
                                              "KV cache against recomputation"}
    assert all(g.measured for g in report.goals)


def test_greedy_and_beam_tokens_agree_with_transformers(report):
    found = tables(report.markdown)
    speed = next(rows for h, rows in found.items() if h.startswith("## Decoding speed"))
    deterministic = [r for r in speed if r["mode"].startswith(("greedy", "beam"))]
    assert len(deterministic) == 6  # two sizes: greedy batch 1 and 8, beam search
    assert all(r["same tokens"] == "yes" for r in deterministic), deterministic
    assert {r["model"] for r in speed} == {s.name for s in decoding.SIZES[:2]}
    kv = next(rows for h, rows in found.items() if h.startswith("## KV cache against"))
    assert [r["same tokens"] for r in kv] == ["yes"] * 3  # the cache changes the speed, not the tokens
    ttft = next(rows for h, rows in found.items() if h.startswith("## Time to first token"))
    assert all(r["same token"] == "yes" for r in ttft)
