"""The suite's command (python -m bench) writes its document; bench/hardware measures both ceilings; the before/after
tables compare today's decoding and EM with the code before the performance work, and both give the same results.
No time is asserted: the machine may be busy."""

import subprocess
from pathlib import Path

import pytest
import torch

from bench import __main__ as suite
from bench import before_after, hardware
from genserve.models.linear import ONEDNN

torch.set_num_threads(1)


def test_hardware_measures_matmul_flops_by_library_and_bandwidth():
    flops = hardware.matmul_flops(n=256, repeats=1)
    assert set(flops) == ({"MKL", "oneDNN"} if ONEDNN else {"MKL"})
    assert all(value > 1e8 for value in flops.values())  # any CPU does 0.1 GFLOP/s
    assert hardware.peak_flops(n=256, repeats=1) > 1e8
    assert hardware.peak_bandwidth(megabytes=16, repeats=1) > 1e8


def has_revision(revision: str) -> bool:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{revision}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not has_revision(before_after.BASE), reason="needs the git history (a shallow clone lacks it)")
def test_suite_writes_the_document_with_the_record_and_before_after_tables(tmp_path):
    out = tmp_path / "benchmarks.md"
    text = suite.main(["--quick", "--only", "before_after", "--out", str(out)])
    assert out.read_text() == text
    assert text.startswith("# Benchmarks") and "- Machine: " in text and "## Goals (0 of 0 met)" in text
    assert suite.FIXES.read_text().splitlines()[0] in text  # the profiling record
    assert text.index(suite.FIXES.read_text().splitlines()[0]) < text.index("## Before and after: decoding")
    rows = {}
    for section in ("## Before and after: decoding", "## Before and after: EM"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        rows[section] = [line for line in body.splitlines() if line.startswith("| ") and "speed-up" not in line]
    assert len(rows["## Before and after: decoding"]) == 2 and len(rows["## Before and after: EM"]) == 2
    for line in rows["## Before and after: decoding"] + rows["## Before and after: EM"]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-1] == "yes", line  # same tokens, same fit
        assert cells[-2].endswith("x") and float(cells[-2][:-1]) > 0


def test_unknown_areas_are_refused():
    with pytest.raises(SystemExit):
        suite.main(["--only", "decoding,warp-drive"])
