"""`genserve score` against the session's real server over HTTP (see conftest): records, texts and images,
chunks the server refuses (split until only the refused rows are left), a server that goes away mid-run, and
the command itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from genserve.service import file_scorer
from genserve.service.cli import app
from genserve.service.client import GenserveClient
from genserve.service.file_scorer import HttpBackend, ScoreFileError, score_file
from tests.service.conftest import (
    DIGITS_TRAIN,
    IMAGE_COND,
    REPLICATED,
    TEXT,
    TEXT_CONTEXT,
    TEXT_CORPUS,
    Server,
    digits,
    free_port,
)

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def client(server: Server) -> GenserveClient:
    with GenserveClient(server.url) as c:
        yield c


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_results(rows: list[dict], expected, rel: float = 1e-9) -> None:
    assert len(rows) == len(expected.results)
    for row, result in zip(rows, expected.results, strict=True):
        assert not row["error"], row
        assert float(row["score"]) == pytest.approx(result.score, rel=rel, abs=rel)
        assert float(row["log_prob"]) == pytest.approx(result.log_prob, rel=rel, abs=rel)
        assert float(row["percentile"]) == pytest.approx(result.percentile, abs=1e-6)
        assert str(row["is_anomaly"]).lower() == str(result.is_anomaly).lower()
        assert float(row["threshold"]) == pytest.approx(expected.threshold)


def test_records_csv_over_http_in_chunks_of_the_server_limit(server: Server, client: GenserveClient,
                                                             tmp_path: Path) -> None:
    info = client.model(REPLICATED)
    names, x = list(info.input.feature_names), load_breast_cancer().data
    input = tmp_path / "bc.csv"
    with input.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", *names])
        for i, record in enumerate(x):
            w.writerow([f"p{i}", *record])
        w.writerow(["bad", *x[0][:-1]])  # line 571: a value short
    summary = score_file(input, REPLICATED, tmp_path / "out.csv", url=server.url, id_column="patient",
                         chunk_size=10_000)
    assert info.limits.max_records_per_request == 500 and summary.requests == 2  # capped at the limit
    rows = read_rows(tmp_path / "out.csv")
    assert [int(r["line"]) for r in rows] == list(range(2, 572)) and rows[0]["id"] == "p0"
    assert rows[-1]["error"] == "line 571: 30 fields, the header has 31" and rows[-1]["score"] == ""
    for start, end in ((0, 500), (500, 569)):  # the server's own answers, in the server's batches
        expected = client.anomaly(REPLICATED, x[start:end])
        assert_results(rows[start:end], expected, rel=1e-6)
        assert [int(r["component"]) for r in rows[start:end]] == [r.component for r in expected.results]
    assert (summary.rows, summary.scored, summary.bad) == (570, 569, 1)
    assert summary.score_type == "ensemble" and summary.version == info.version


def test_rows_the_server_refuses_are_isolated_and_the_rest_scored(server: Server, client: GenserveClient,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Let non-finite values past the local checks, so that only the server can refuse them (a 422).
    monkeypatch.setattr(file_scorer, "_finite", lambda x, feature: x)
    x = load_breast_cancer().data[:40].tolist()
    lines = [json.dumps(r) for r in x]
    poisoned = {5: "NaN", 17: "Infinity", 18: "-Infinity"}  # 0-based rows
    for i, literal in poisoned.items():
        lines[i] = "[" + ", ".join([literal, *map(str, x[i][1:])]) + "]"
    input = tmp_path / "in.jsonl"
    input.write_text("\n".join(lines) + "\n")
    summary = score_file(input, REPLICATED, tmp_path / "out.jsonl", url=server.url, chunk_size=16)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 41))
    bad = {r["line"] - 1: r["error"] for r in rows if r["error"]}
    assert set(bad) == set(poisoned)
    assert all(e.startswith(f"line {i + 1}: ") and "finite" in e.lower() for i, e in bad.items()), bad
    good = [i for i in range(40) if i not in poisoned]
    assert_results([rows[i] for i in good], client.anomaly(REPLICATED, [x[i] for i in good]), rel=1e-6)
    assert summary.requests > 3  # three chunks, and the splits of the two refused ones
    assert (summary.scored, summary.bad) == (37, 3)


def test_texts_too_long_or_unknown_are_reported_per_row(server: Server, client: GenserveClient,
                                                        tmp_path: Path) -> None:
    corpus_lines = [line for line in TEXT_CORPUS.splitlines() if line][:6]
    texts = [*corpus_lines, TEXT_CORPUS[: TEXT_CONTEXT + 10], "to be §", *corpus_lines[:3]]
    input = tmp_path / "texts.jsonl"
    input.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
                     + '{"text": 3}\n{"text": "  "}\n')
    summary = score_file(input, TEXT, tmp_path / "out.csv", url=server.url, id_column="n")
    rows = read_rows(tmp_path / "out.csv")
    assert [int(r["line"]) for r in rows] == list(range(1, 14)) and rows[6]["id"] == "6"
    assert "context length" in rows[6]["error"] and rows[6]["error"].startswith("line 7: ")
    assert rows[7]["error"].startswith("line 8: ") and "§" in rows[7]["error"]
    assert rows[11]["error"] == "line 12: the text is a JSON number, not a string"
    assert rows[12]["error"] == "line 13: the text is empty"
    good = [i for i in range(len(texts)) if i not in (6, 7)]
    expected = client.anomaly_texts(TEXT, [texts[i] for i in good[:8]])
    assert_results([rows[i] for i in good[:8]], expected, rel=1e-5)
    assert expected.score_type == summary.score_type == "ensemble"  # the calibration's default
    assert (summary.rows, summary.scored, summary.bad) == (13, 9, 4)


def test_images_with_and_without_labels(server: Server, client: GenserveClient, tmp_path: Path) -> None:
    images, labels = digits()
    held = images[DIGITS_TRAIN:DIGITS_TRAIN + 8]
    rows_in = [{"image": im.tolist(), **({"label": int(y)} if i % 2 else {})}
               for i, (im, y) in enumerate(zip(held, labels[DIGITS_TRAIN:], strict=False))]
    rows_in[3] = {"image": held[3].tolist()[:7]}  # 7 rows, not 8
    rows_in[4]["label"] = 10  # the model has 10 classes
    input = tmp_path / "images.jsonl"
    input.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    summary = score_file(input, IMAGE_COND, tmp_path / "out.jsonl", url=server.url, score="nll")
    rows = read_rows(tmp_path / "out.jsonl")
    assert "7 rows" in rows[3]["error"] and "not an integer in [0, 9]" in rows[4]["error"]
    unlabelled, labelled = [0, 2, 6], [1, 5, 7]
    assert_results([rows[i] for i in unlabelled],
                   client.anomaly_images(IMAGE_COND, held[unlabelled], score="nll"), rel=1e-6)
    assert_results([rows[i] for i in labelled],
                   client.anomaly_images(IMAGE_COND, held[labelled], labels=[rows_in[i]["label"] for i in labelled],
                                         score="nll"), rel=1e-6)
    assert (summary.scored, summary.bad) == (6, 2) and "component" not in rows[0]


def test_a_server_gone_mid_run_stops_keeping_what_was_written(server: Server, tmp_path: Path) -> None:
    x = load_breast_cancer().data[:30]
    input = tmp_path / "in.jsonl"
    input.write_text("".join(json.dumps(r) + "\n" for r in x.tolist()))
    out = tmp_path / "out.jsonl"
    backend = HttpBackend(server.url, REPLICATED)

    def server_goes_away(k: int) -> None:
        backend.client._http.base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    with pytest.raises(ScoreFileError, match=r"after 3 tries(.|\n)*10 rows are in .*run the same command again"):
        score_file(input, REPLICATED, out, backend=backend, chunk_size=10, retries=2, retry_delay=0.01,
                   on_chunk=server_goes_away)
    backend.close()
    assert [r["line"] for r in read_rows(out)] == list(range(1, 11))
    resumed = score_file(input, REPLICATED, out, url=server.url, chunk_size=10)
    assert resumed.resumed_after_line == 10 and resumed.rows == 30 and resumed.scored == 30
    assert [r["line"] for r in read_rows(out)] == list(range(1, 31))


def test_the_score_command(server: Server, tmp_path: Path) -> None:
    x = load_breast_cancer().data[:25]
    input = tmp_path / "in.jsonl"
    input.write_text("".join(json.dumps({"record": r, "key": i}) + "\n" for i, r in enumerate(x.tolist()))
                     + "not json\n")
    out = tmp_path / "scores.jsonl"
    args = ["score", str(input), "--model", REPLICATED, "--out", str(out), "--url", server.url,
            "--id-column", "key", "--false-positive-rate", "0.2", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "26 rows read, 25 scored" in result.output and "line 26: not valid JSON" in result.output
    rows = read_rows(out)
    assert rows[3]["id"] == 3 and np.isfinite(rows[3]["score"]) and rows[25]["score"] is None
    assert json.loads((tmp_path / "scores.jsonl.genserve.json").read_text())["false_positive_rate"] == 0.2
    again = runner.invoke(app, [*args[:-3], "--quiet"])  # without the rate: not the same run
    assert again.exit_code == 2 and "--restart" in again.output
    dead = runner.invoke(app, ["score", str(input), "--model", REPLICATED, "--out", str(tmp_path / "o.jsonl"),
                               "--url", f"http://127.0.0.1:{free_port()}"])
    assert dead.exit_code == 2 and "cannot reach the genserve server" in dead.output
    unknown = runner.invoke(app, ["score", str(input), "--model", "nope", "--out", str(tmp_path / "o.jsonl"),
                                  "--url", server.url])
    assert unknown.exit_code == 2 and "no model named 'nope'" in unknown.output
