"""The benchmark scripts that write docs/ still run end to end (tiny presets, a temporary output)."""

import torch

from bench import image_results

torch.set_num_threads(1)


def test_image_results_writes_the_table_and_pictures(tmp_path):
    out = tmp_path / "image-models.md"
    image_results.main(["--preset", "tiny", "--datasets", "digits", "--out", str(out)])
    text = out.read_text()
    for label in ("FVSBN", "NADE", "MADE", "gated PixelCNN", "class-conditional"):
        assert label in text
    assert text.count("| digits") == 0 and "## digits" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "bits/dim" not in line]
    assert len(rows) == 5  # four families and the class-conditional PixelCNN
    assert (tmp_path / "images" / "digits-samples.png").stat().st_size > 100
    assert (tmp_path / "images" / "digits-completions.png").stat().st_size > 100


def test_anomaly_quick_writes_a_row_per_task(tmp_path):
    from bench import anomaly

    out = tmp_path / "anomaly.md"
    sections = anomaly.main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert [s.key for s in sections] == [s[0] for s in anomaly.SECTIONS]
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    expected = [name for s in sections for name, *_ in anomaly.summary_rows(s)]
    # breast_cancer, wine 0, digits, shifted and enlarged digits, MNIST 0, five trap kinds, two kinds of prose
    assert len(rows) == len(expected) == 13
    assert all(row.startswith(f"| {name} |") for row, name in zip(rows, expected, strict=True))
    values = [float(v.strip("* ")) for line in text.splitlines() if line.startswith("| genserve")
              or line.startswith("| IsolationForest") for v in line.split("|")[2:-1]]
    assert values and all(0.0 <= v <= 1.0 for v in values)
    for section in sections:
        for task in section.tasks:
            assert all(0.0 <= auroc <= 1.0 and 0.0 <= auprc <= 1.0 for auroc, auprc in task.metrics().values())
    breast = sections[0].tasks[0].metrics()
    assert breast["genserve GMM ensemble (default)"][0] > 0.85 and breast["genserve GMM knn"][0] > 0.85
    met, total, _, singles = anomaly.goal_counts(sections)
    assert total == 13 and singles == 13 and f"Met on **{met} of 13** rows" in text
    assert sum(row.endswith(" met |") for row in rows) == met
    # Each genserve default's flagged share of normal items at the calibrated rates, and the cost of each score.
    assert set(sections[0].tasks[0].flagged) == {"genserve GMM ensemble (default)"}
    *shares, n_calibration = sections[0].tasks[0].flagged["genserve GMM ensemble (default)"]
    assert len(shares) == 2 and all(0.0 <= f <= 1.0 for f in shares) and n_calibration > 10
    assert "normal test items of each task" in text and "## Cost of each score type" in text
    cost_rows = [line for line in text.split("## Cost of each score type")[1].splitlines() if line.startswith("| ")]
    assert [r.split(" (")[0] for r in cost_rows[1:]] == ["| GMM", "| MADE", "| conditional MADE", "| PixelCNN",
                                                          "| 3-gram", "| GPT"]
    # the class-conditional MADE has the class scores, the GPT text knn; the n-gram has none (no hidden states)
    assert "genserve conditional MADE class entropy" in text and "genserve GPT knn" in text
    assert "genserve 3-gram knn" not in text
    assert "## breast_cancer" in text and "## Runtime" in text


def test_latent_results_writes_the_bounds_table(tmp_path):
    from bench import latent_results

    out = tmp_path / "latent-models.md"
    latent_results.main(["--preset", "tiny", "--datasets", "digits", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| digits")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    elbo, k1, k10 = float(cells[5]), float(cells[6]), float(cells[7])
    assert elbo < 0 and k1 < 0 and k10 < 0 and cells[8] == "-"  # the tiny preset evaluates K = 1 and 10
    assert 0 < float(cells[10]) < 5
