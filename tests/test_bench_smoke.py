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
