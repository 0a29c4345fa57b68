"""service/file_scorer.py in process (--local semantics): row accounting, formats, resume, settings checks.

A one-component GMM of sklearn's wine is trained into a temporary store once; every expected value comes from
LocalScorer.anomaly on the same records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_wine
from typer.testing import CliRunner

from genserve.service.cli import app
from genserve.service.file_scorer import ScoreFileError, score_file, sidecar_path
from genserve.service.local import LocalScorer
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm

NAME = "w"
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=NAME, components=1, n_init=1, export_onnx=False), root,
              progress=False)
    return root


@pytest.fixture(scope="module")
def scorer(store: Path) -> LocalScorer:
    return LocalScorer.from_store(store, NAME)


@pytest.fixture(scope="module")
def names(scorer: LocalScorer) -> list[str]:
    return list(scorer.manifest.input.feature_names)


def wine(n: int, start: int = 0) -> list[list[float]]:
    return load_wine().data[start:start + n].tolist()


def score(store: Path, input: Path, output: Path, **options) -> object:
    return score_file(input, NAME, output, local=True, store=store, **options)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_rows(path: Path) -> list[dict]:
    return read_csv(path) if path.suffix == ".csv" else read_jsonl(path)


FLOATS = ("score", "percentile", "log_prob", "threshold", "responsibility")


def assert_same_output(a: Path, b: Path) -> None:
    """The same rows, lines, ids and errors; the same numbers up to rounding (a batch's composition may move
    the last bits of a float)."""
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert [r["line"] for r in rows_a] == [r["line"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in FLOATS and ra[key] not in (None, ""):
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-12, abs=1e-12), (key, ra, rb)
            else:
                assert ra[key] == rb[key], (key, ra, rb)


def assert_scored_like(rows: list[dict], scorer: LocalScorer, records: list[list[float]], **options) -> None:
    """The output's scored rows carry what LocalScorer.anomaly says about the same records."""
    expected = scorer.anomaly(records=records, **options)
    assert len(rows) == len(records)
    for row, result in zip(rows, expected.results, strict=True):
        assert not row["error"]
        assert float(row["score"]) == pytest.approx(result.score, rel=1e-9, abs=1e-9)
        assert float(row["log_prob"]) == pytest.approx(result.log_prob, rel=1e-9, abs=1e-9)
        assert float(row["percentile"]) == pytest.approx(result.percentile, abs=1e-9)
        assert str(row["is_anomaly"]).lower() == str(result.is_anomaly).lower()
        assert float(row["threshold"]) == pytest.approx(expected.threshold, rel=1e-12)
        assert int(row["component"]) == result.component
        assert float(row["responsibility"]) == pytest.approx(result.responsibility, rel=1e-9, abs=1e-12)


# ---- every row accounted for -------------------------------------------------------------------------------


def mixed_jsonl(names: list[str]) -> tuple[list[str], dict[int, str], dict[int, list[float]]]:
    """Lines of a JSONL file with good rows in all three shapes and bad rows of every kind; the expected
    error fragment of each bad line and the record of each good one (1-based line numbers)."""
    good = wine(6)
    lines = [
        json.dumps({"id": "a", **dict(zip(names, good[0], strict=True))}),  # 1 object keyed by feature
        json.dumps({"id": "b", "record": good[1]}),  # 2
        json.dumps(good[2]),  # 3 bare list
        "",  # 4 blank
        '{"record": [1, 2,',  # 5 malformed
        json.dumps(good[3][:-1]),  # 6 one value short
        json.dumps(["x", *good[3][1:]]),  # 7 non-numeric
        "[" + ", ".join(["NaN", *map(str, good[3][1:])]) + "]",  # 8 NaN literal
        json.dumps({"id": "c", **dict(zip(names[1:], good[4][1:], strict=True))}),  # 9 a feature missing
        '"just a string"',  # 10
        json.dumps({"id": "d", "record": good[4]}),  # 11
        "   ",  # 12 whitespace only
        json.dumps(good[5]),  # 13
        json.dumps([True, *good[5][1:]]),  # 14 boolean
    ]
    errors = {4: "empty line", 5: "not valid JSON", 6: f"12 values, the model expects {len(names)} features",
              7: "is not a number", 8: "must be finite", 9: f"missing feature {names[0]}", 10: "a JSON string",
              12: "empty line", 14: "is not a number"}
    records = {1: good[0], 2: good[1], 3: good[2], 11: good[4], 13: good[5]}
    return lines, errors, records


def test_every_jsonl_line_is_in_the_output(store: Path, scorer: LocalScorer, names: list[str],
                                           tmp_path: Path) -> None:
    lines, errors, records = mixed_jsonl(names)
    input = tmp_path / "in.jsonl"
    input.write_text("\n".join(lines))  # no line break after the last line
    summary = score(store, input, tmp_path / "out.jsonl", id_column="id", chunk_size=4)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    assert [r["id"] for r in rows if r["line"] in (1, 2, 9, 11)] == ["a", "b", "c", "d"]
    for row in rows:
        if row["line"] in errors:
            assert row["error"].startswith(f"line {row['line']}: ") and errors[row["line"]] in row["error"], row
            assert row["score"] is None and row["is_anomaly"] is None
    assert_scored_like([r for r in rows if r["line"] in records], scorer, list(records.values()))
    assert (summary.rows, summary.scored, summary.bad) == (len(lines), len(records), len(errors))
    assert summary.flagged == sum(r["is_anomaly"] is True for r in rows)
    assert summary.score_type == "ensemble" and summary.bad_rows[0].startswith("line 4: empty line")
    report = summary.report()
    assert f"{len(lines)} rows read, {len(records)} scored" in report and "line 5: not valid JSON" in report


def test_csv_columns_by_name_multiline_rows_and_bad_cells(store: Path, scorer: LocalScorer, names: list[str],
                                                          tmp_path: Path) -> None:
    good = wine(4, start=100)
    header = ["note", *reversed(names), "key"]  # reordered, with extra columns

    def cells(record: list[float], note: str = "", key: str = "") -> list[str]:
        return [note, *map(str, reversed(record)), key]

    input = tmp_path / "in.csv"
    with input.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)  # line 1
        w.writerow(cells(good[0], key="k1"))  # line 2
        w.writerow(cells(good[1], note="two\nlines", key="k2"))  # lines 3-4: a quoted line break
        f.write("\n")  # line 5: blank
        w.writerow(cells(good[2], key="k3")[:-2])  # line 6: short
        bad = cells(good[2], key="k4")
        bad[3] = "abc"
        w.writerow(bad)  # line 7
        bad[3] = ""
        w.writerow(bad)  # line 8: empty cell
        bad[3] = "inf"
        w.writerow(bad)  # line 9
        w.writerow(cells(good[3], key="k5"))  # line 10
    summary = score(store, input, tmp_path / "out.csv", id_column="key", chunk_size=3)
    text = (tmp_path / "out.csv").read_text()
    assert text.splitlines()[0] == ("line,id,score,percentile,is_anomaly,log_prob,threshold,component,"
                                    "responsibility,error")
    rows = read_csv(tmp_path / "out.csv")
    assert [int(r["line"]) for r in rows] == [2, 3, 5, 6, 7, 8, 9, 10]
    assert [r["id"] for r in rows] == ["k1", "k2", "", "", "k4", "k4", "k4", "k5"]
    errors = {r["line"]: r["error"] for r in rows if r["error"]}
    assert errors == {
        "5": "line 5: empty line",
        "6": f"line 6: {len(header) - 2} fields, the header has {len(header)}",
        "7": f"line 7: feature {names[-3]!r}: 'abc' is not a number",
        "8": f"line 8: feature {names[-3]!r} is empty",
        "9": f"line 9: feature {names[-3]!r} is inf; values must be finite numbers",
    }
    assert_scored_like([r for r in rows if not r["error"]], scorer, [good[0], good[1], good[3]])
    assert (summary.rows, summary.scored, summary.bad) == (8, 3, 5)


def test_missing_columns_stop_before_anything_is_written(store: Path, names: list[str], tmp_path: Path) -> None:
    input = tmp_path / "in.csv"
    input.write_text(",".join(names[1:]) + "\n" + ",".join("1" for _ in names[1:]) + "\n")
    with pytest.raises(ScoreFileError, match=f"no column {names[0]} in the header"):
        score(store, input, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    input.write_text(",".join(names) + "\n")
    with pytest.raises(ScoreFileError, match="no column row_id"):
        score(store, input, tmp_path / "out.csv", id_column="row_id")


def test_threshold_false_positive_rate_and_score_type(store: Path, scorer: LocalScorer, tmp_path: Path) -> None:
    records = wine(20, start=30)
    input = tmp_path / "in.jsonl"
    input.write_text("".join(json.dumps(r) + "\n" for r in records))
    score(store, input, tmp_path / "fpr.jsonl", false_positive_rate=0.3, score="bits_per_dim")
    assert_scored_like(read_jsonl(tmp_path / "fpr.jsonl"), scorer, records, false_positive_rate=0.3,
                       score="bits_per_dim")
    summary = score(store, input, tmp_path / "thr.csv", threshold=-1e9)
    rows = read_csv(tmp_path / "thr.csv")
    assert all(r["is_anomaly"] == "true" and float(r["threshold"]) == -1e9 for r in rows)
    assert summary.flagged == len(records)
    with pytest.raises(ScoreFileError, match="score 'complexity' is not available"):
        score(store, input, tmp_path / "x.jsonl", score="complexity")
    with pytest.raises(ScoreFileError, match="not both"):
        score(store, input, tmp_path / "x.jsonl", threshold=1.0, false_positive_rate=0.1)


# ---- resume ------------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after(k: int):
    def hook(done: int) -> None:
        if done == k:
            raise Crash

    return hook


def input_with_bad_rows(tmp_path: Path, n: int = 50) -> Path:
    lines = [json.dumps({"id": i, "record": r}) for i, r in enumerate(wine(n, start=40))]
    bad = {7: "{broken", 23: "", 31: json.dumps({"id": 31, "record": [1.0, 2.0]})}  # lines 8, 24, 32
    for i, line in bad.items():
        if i < n:
            lines[i] = line
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_a_crash_mid_line_equals_an_uninterrupted_run(store: Path, tmp_path: Path, fmt: str) -> None:
    input = input_with_bad_rows(tmp_path)
    full, out = tmp_path / f"full.{fmt}", tmp_path / f"out.{fmt}"
    expected = score(store, input, full, id_column="id", chunk_size=6)
    with pytest.raises(Crash):
        score(store, input, out, id_column="id", chunk_size=6, on_chunk=crash_after(3))
    written = out.read_bytes()
    assert written.count(b"\n") == 3 * 6 + (fmt == "csv")
    with out.open("r+b") as f:  # the crash cut the last row short
        f.truncate(len(written) - 7)
    resumed = score(store, input, out, id_column="id", chunk_size=4)  # the chunk size may change
    assert_same_output(out, full)
    assert resumed.resumed_after_line == 17 and resumed.rows_this_run == 50 - 17
    assert (resumed.rows, resumed.scored, resumed.bad, resumed.flagged) == (
        expected.rows, expected.scored, expected.bad, expected.flagged)
    again = score(store, input, out, id_column="id")  # complete: nothing left to do
    assert again.rows_this_run == 0 and again.rows == 50
    assert_same_output(out, full)


def test_resume_when_only_the_header_or_nothing_was_written(store: Path, tmp_path: Path) -> None:
    input = input_with_bad_rows(tmp_path, n=10)
    full, out = tmp_path / "full.csv", tmp_path / "out.csv"
    score(store, input, full, chunk_size=4)
    with pytest.raises(Crash):
        score(store, input, out, chunk_size=4, on_chunk=crash_after(1))
    out.write_bytes(out.read_bytes()[:5])  # a header cut short
    assert score(store, input, out, chunk_size=4).resumed_after_line == 0
    assert_same_output(out, full)


def test_changed_settings_are_refused_and_restart_starts_over(store: Path, tmp_path: Path) -> None:
    input = input_with_bad_rows(tmp_path, n=20)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        score(store, input, out, chunk_size=5, on_chunk=crash_after(2))
    for change, fragment in (({"threshold": 30.0}, "threshold: None then, 30.0 now"),
                             ({"score": "bits_per_dim"}, "score: 'ensemble' then, 'bits_per_dim' now"),
                             ({"id_column": "id"}, "id_column")):
        with pytest.raises(ScoreFileError, match="--restart") as e:
            score(store, input, out, **change)
        assert fragment in str(e.value)
    with input.open("a") as f:  # the input grew
        f.write(json.dumps(wine(1)[0]) + "\n")
    with pytest.raises(ScoreFileError, match="input_size"):
        score(store, input, out)
    summary = score(store, input, out, threshold=30.0, restart=True)
    assert summary.resumed_after_line == 0 and summary.rows == 21
    assert json.loads(sidecar_path(out).read_text())["threshold"] == 30.0
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"line": 1}\n')
    with pytest.raises(ScoreFileError, match="not written by genserve score"):
        score(store, input, foreign)


# ---- the command -------------------------------------------------------------------------------------------


def test_cli_scores_locally_and_reports(store: Path, scorer: LocalScorer, tmp_path: Path) -> None:
    input = input_with_bad_rows(tmp_path, n=40)
    out = tmp_path / "scores.csv"
    args = ["score", str(input), "--model", NAME, "--out", str(out), "--local", "--store", str(store),
            "--id-column", "id", "--chunk-size", "5", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "40 rows read, 37 scored" in result.output and "3 bad rows" in result.output
    assert "line 8: not valid JSON" in result.output and "line 24: empty line" in result.output
    rows = read_csv(out)
    assert [int(r["line"]) for r in rows] == list(range(1, 41)) and rows[0]["id"] == "0"
    good = [r for r in rows if not r["error"]]
    records = [json.loads(line)["record"] for line in input.read_text().splitlines() if line.startswith('{"id"')]
    assert_scored_like(good, scorer, [r for r in records if len(r) == len(records[0])])
    missing = runner.invoke(app, ["score", str(tmp_path / "nope.jsonl"), "--model", NAME, "--out",
                                  str(tmp_path / "o.csv"), "--local", "--store", str(store)])
    assert missing.exit_code == 2 and "no such readable file" in missing.output
    unknown = runner.invoke(app, ["score", str(input), "--model", "nope", "--out", str(tmp_path / "o.csv"),
                                  "--local", "--store", str(store)])
    assert unknown.exit_code == 2 and "nope" in unknown.output


def test_invalid_utf8_huge_numbers_and_an_empty_file(store: Path, names: list[str], tmp_path: Path) -> None:
    good = wine(2)
    input = tmp_path / "in.jsonl"
    input.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b'{"record": [1, 2, "\xff"]}',
                                  ("[" + ", ".join(["1" + "0" * 400, *map(str, good[1][1:])]) + "]").encode(),
                                  ("[" + ", ".join(["1e400", *map(str, good[1][1:])]) + "]").encode(),
                                  json.dumps(good[1]).encode()]) + b"\n")
    summary = score(store, input, tmp_path / "out.jsonl")
    errors = [r["error"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert errors[0] is None and errors[4] is None
    assert errors[1] == "line 2: not valid UTF-8"
    assert errors[2].startswith(f"line 3: feature {names[0]!r}: 1000") and "too large" in errors[2]
    assert errors[3] == f"line 4: feature {names[0]!r} is inf; values must be finite numbers"
    assert (summary.rows, summary.scored) == (5, 2)

    csv_input = tmp_path / "in.csv"
    csv_input.write_bytes(",".join(names).encode() + b"\n" + b",".join(b"1" for _ in names) + b"\xff\n")
    (row,) = read_csv(tmp_path / "out.csv") if score(store, csv_input, tmp_path / "out.csv") else []
    assert row["line"] == "2" and row["error"] == "line 2: not valid UTF-8"

    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert score(store, empty, tmp_path / "empty-out.jsonl").rows == 0
    assert (tmp_path / "empty-out.jsonl").read_bytes() == b""
