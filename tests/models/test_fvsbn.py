import pytest
import torch

from genserve.models.fvsbn import FVSBN, FVSBNConfig
from tests.models.test_image import (
    check_autoregressive,
    check_onnx,
    randomise,
)

torch.set_num_threads(1)

CASES = [(2, 0), (3, 0), (2, 3), (3, 2)]  # (levels, n_classes)


def make(height: int = 2, width: int = 2, levels: int = 2, n_classes: int = 0) -> FVSBN:
    return randomise(FVSBN(FVSBNConfig(height=height, width=width, levels=levels, n_classes=n_classes)))


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_autoregressive_in_raster_order(levels, n_classes):
    model = make(3, 4, levels, n_classes)
    d = model.n_pixels
    labels = torch.arange(4) % n_classes if n_classes else None

    def logits(values):
        weight = (model.weight * model.mask).view(d * model.out_channels, d)
        return (values @ weight.T).view(-1, d, model.out_channels) + model._bias(labels, values.shape[0])

    torch.testing.assert_close(logits(model.scaled(torch.ones(4, 12, dtype=torch.long))),
                               model.pixel_logits(torch.ones(4, 3, 4, dtype=torch.long), labels))
    check_autoregressive(logits, torch.arange(d), d)


def test_onnx_conditional():
    check_onnx(make(3, 2, 3, n_classes=3).float())
