"""training/reporting.py: the pictures and logs a run keeps besides its model."""

import io
import json

import numpy as np
import torch
from PIL import Image

from genserve.training.reporting import LOSS_CURVE, TRAINING_LOG, class_grid_png, grid_png, log_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_grid_png_scales_levels_to_8_bits():
    images = np.array([[[0, 16], [8, 16]]] * 3)
    png = Image.open(io.BytesIO(grid_png(images, levels=17, columns=2, scale=1, pad=1)))
    pixels = np.asarray(png)
    assert pixels.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert pixels[1:3, 1:3].tolist() == [[0, 255], [128, 255]]


def test_a_class_conditional_grid_has_one_column_per_class():
    asked = []

    def sample(n: int, labels: torch.Tensor | None) -> torch.Tensor:
        asked.append((n, labels))
        return labels.view(n, 1, 1).expand(n, 2, 2)  # each image is its label's grey level

    png = Image.open(io.BytesIO(class_grid_png(sample, n_classes=3, levels=3, grid_size=2,
                                               device=torch.device("cpu"))))
    (n, labels), = asked
    assert n == 6 and labels.tolist() == [0, 1, 2, 0, 1, 2]
    scale = 84 // 2
    assert png.size == (3 * (2 * scale + 2) + 2, 2 * (2 * scale + 2) + 2)  # 3 columns (classes) x 2 rows


def test_log_files_are_the_curve_and_the_history_as_json():
    files = log_files({"train": [[1, 0.5]]}, PNG_SIGNATURE)
    assert files[LOSS_CURVE] == PNG_SIGNATURE
    assert json.loads(files[TRAINING_LOG]) == {"train": [[1, 0.5]]}
