"""The contract every raster-order image model with its own incremental sampler keeps (FVSBN, NADE): exact
normalisation and the chain rule, its sampler equal to the base class's, seeded sampling and completion,
sample frequencies, and the artifact round trip. MADE (orderings, an ensemble) and the PixelCNN have their own
versions of these in their files."""

import pytest
import torch

from tests.models import test_fvsbn, test_nade
from tests.models.test_image import (
    check_chain_rule,
    check_incremental_sampler,
    check_normalised,
    check_registry_round_trip,
    check_sample_frequencies,
    check_sampling,
)

torch.set_num_threads(1)

MAKE = {"fvsbn": test_fvsbn.make, "nade": test_nade.make}
CASES = [(2, 0), (3, 0), (2, 3), (3, 2)]  # (levels, n_classes)
KINDS = sorted(MAKE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_normalised_and_chain_rule(kind, levels, n_classes):
    model = MAKE[kind](levels=levels, n_classes=n_classes)
    if n_classes:
        model.set_class_prior(torch.arange(n_classes).repeat_interleave(torch.arange(1, n_classes + 1)))
    check_normalised(model)
    check_chain_rule(model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("levels", "n_classes"), CASES)
@pytest.mark.parametrize("known", [0, 5])
def test_incremental_sampler_matches_the_base_class(kind, levels, n_classes, known):
    check_incremental_sampler(MAKE[kind](3, 3, levels, n_classes), known=known)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_sampling(kind, levels, n_classes):
    check_sampling(MAKE[kind](3, 3, levels, n_classes))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (2, 2)])
def test_sample_frequencies(kind, levels, n_classes):
    check_sample_frequencies(MAKE[kind](levels=levels, n_classes=n_classes))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("levels", "n_classes"), [(2, 0), (3, 2)])
def test_registry_round_trip(kind, levels, n_classes):
    check_registry_round_trip(kind, MAKE[kind](levels=levels, n_classes=n_classes))
