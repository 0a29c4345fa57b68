"""bench/scoring.py's quick mode runs end to end and reports every section with numbers in its tables."""

import re

import torch

from bench import scoring
from bench.common import Goal, Report

torch.set_num_threads(1)

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?x?$")


def table_rows(markdown: list[str], section: str) -> list[list[str]]:
    start = markdown.index(section)
    end = next((i for i in range(start + 1, len(markdown)) if markdown[i].startswith("## ")), len(markdown))
    lines = [line for line in markdown[start:end] if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_quick_run_reports_scoring_em_and_sampling() -> None:
    report = scoring.run(quick=True)
    assert isinstance(report, Report)
    sections = [line for line in report.markdown if line.startswith("## ")]
    assert sections == ["## Density scoring: torch eager vs ONNX Runtime (CPU)",
                        "## EM fitting time against scikit-learn", "## Image sampling (torch)"]
    scoring_rows = table_rows(report.markdown, sections[0])
    throughput = [r for r in scoring_rows if r[0] != "model" and len(r) == 5]
    assert {r[0].split(",")[0] for r in throughput} == {"GMM breast_cancer (30 features)", "MADE", "gated PixelCNN"}
    assert all(NUMBER.match(cell) for r in throughput for cell in r[1:])
    auto = [r for r in scoring_rows if r[0] != "model" and len(r) == 4]
    assert len(auto) == 3 and all(r[3] in ("torch", "onnx") for r in auto)
    em = [r for r in table_rows(report.markdown, sections[1]) if r[0] != "data"]
    assert len(em) == 2 and all(NUMBER.match(cell) for r in em for cell in r[1:])
    sampling = [r for r in table_rows(report.markdown, sections[2]) if r[0] != "model"]
    assert len(sampling) == 5 and all(NUMBER.match(cell) for r in sampling for cell in r[1:])
    assert [g.name for g in report.goals] == ["density scoring, ONNX Runtime vs torch", "EM fitting vs scikit-learn"]
    assert all(isinstance(g, Goal) and g.measured for g in report.goals)
