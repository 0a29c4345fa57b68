"""bench/served.py still runs end to end in quick mode: one Ray Serve instance, three models, every table filled
and every request answered (no timing is asserted: the machine may be shared)."""

import math

import pytest
import torch

from bench import served

torch.set_num_threads(1)
pytestmark = pytest.mark.integration


def table_rows(lines: list[str], heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after `heading`, as dicts keyed by the header."""
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#") or (rows and not line.startswith("|")):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


@pytest.mark.timeout(600)
def test_served_quick_fills_every_table_without_errors():
    report = served.run(quick=True)
    lines = report.markdown
    assert "## Served: throughput and latency over HTTP" in lines
    endpoints = served.endpoints()
    for endpoint in endpoints:
        rows = table_rows(lines, f"### {endpoint.title}")
        assert [(int(r["clients"]), r["batching"]) for r in rows] == [
            (c, b) for c in served.QUICK.clients for b in ("on", "off")]
        for row in rows:
            assert int(row["errors"]) == 0, row
            assert int(row["requests"]) > 0, row
            for column in ("req/s", "p50 ms", "p95 ms", "p99 ms"):
                assert math.isfinite(float(row[column])) and float(row[column]) > 0, row
            if endpoint.count_tokens:  # every request generated exactly NEW_TOKENS tokens
                # (up to the rounding of the two columns)
                expected = served.NEW_TOKENS * float(row["req/s"])
                assert float(row["tokens/s"]) == pytest.approx(expected, abs=served.NEW_TOKENS * 0.05 + 0.5)
            elif endpoint.model == served.RECORDS:  # the shipped config scores the GMM in the Gateway, unbatched
                assert row["mean batch"] == "none (scored in the Gateway)", row
            elif row["batching"] == "off":
                assert float(row["mean batch"]) == 1.0, row
            else:
                assert float(row["mean batch"]) >= 1.0, row
        assert rows[0]["req/s on/off"].endswith("x")
    overhead = table_rows(lines, "## Served: overhead of serving")
    assert [r["endpoint"] for r in overhead] == [e.key for e in endpoints] + ["GET /healthz (no model)"]
    for row in overhead[:-1]:
        assert float(row["HTTP p50 ms"]) > 0 and float(row["in-process p50 ms"]) > 0
    memory_rows = table_rows(lines, "## Served: peak memory of the replicas")
    memory = {r["process"]: float(r["peak RSS (VmHWM) MiB"]) for r in memory_rows}
    for name in (served.RECORDS, served.TEXT, served.IMAGES):
        for copy in (name, name + served.UNBATCHED):
            assert memory[f"{copy} replica"] > 10
    assert memory["Gateway replica"] > 10
    plane = table_rows(lines, "## Served: the data plane against the model's own speed")
    assert [(r["request"].split(",")[0], r["route"].split(",")[0]) for r in plane] == [
        ("records", "/v1 log_prob"), ("records", "/v2 infer"), ("images", "/v1 log_prob"), ("images", "/v2 infer"),
        ("records", "baseline app (FastAPI + uvicorn + ONNX Runtime)")]
    for row in plane:
        for column in ("served items/s", "in-process items/s"):
            assert float(row[column].replace(",", "")) > 0, row
    assert any("Failed requests in all of this section: 0." in line for line in lines)
    assert any(line.startswith("| genserve (Ray Serve: proxy, Gateway scoring the model) |") for line in lines)
    assert len(report.goals) == 2 * len(endpoints) + 6
    assert all(goal.measured for goal in report.goals)
