import pytest
import torch

from models.fvsbn import FVSBN, FVSBNConfig
from tests.models.test_image import (
    check_autoregressive,
    check_chain_rule,
    check_incremental_sampler,
    check_normalised,
    check_onnx,
    check_registry_round_trip,
    check_sample_frequencies,
    check_sampling,
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


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_normalised_and_chain_rule(levels, n_classes):
    model = make(levels=levels, n_classes=n_classes)
    if n_classes:
        model.set_class_prior(torch.arange(n_classes).repeat_interleave(torch.arange(1, n_classes + 1)))
    check_normalised(model)
    check_chain_rule(model)


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
@pytest.mark.parametrize("known", [0, 5])
def test_incremental_sampler_matches_the_base_class(levels, n_classes, known):
    check_incremental_sampler(make(3, 3, levels, n_classes), known=known)


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_sampling(levels, n_classes):
    check_sampling(make(3, 3, levels, n_classes))


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (2, 2)])
def test_sample_frequencies(levels, n_classes):
    check_sample_frequencies(make(levels=levels, n_classes=n_classes))


@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_registry_round_trip(levels, n_classes):
    check_registry_round_trip("fvsbn", make(levels=levels, n_classes=n_classes))


def test_onnx_conditional():
    check_onnx(make(3, 2, 3, n_classes=3).float())
