"""The serving table (service/families.py): every kind of every model family has a deployment and an in-process
loader, and each deployment's class keeps its family's replica contract (service/replicas.py) parameter for
parameter, so that the Gateway calls every replica of a family the same way."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from genserve.artifacts import artifact as art
from genserve.artifacts.families import FAMILIES, IMAGE, LATENT, RECORDS, TEXT, family_of
from genserve.service.families import SERVING, ServingFamily, require_family, serving_family
from genserve.service.onnx_session import CPU_PROVIDER, CUDA_PROVIDER, providers_for
from genserve.service.replicas import ImageReplica, RecordsReplica, Replica, TextReplica


def manifest(kind: str, input_type: str) -> SimpleNamespace:
    return SimpleNamespace(name="m", kind=kind, input=SimpleNamespace(type=input_type))


def contract_methods(contract: type) -> list[str]:
    return sorted({name for cls in contract.__mro__ if cls not in (object,) and cls.__module__ != "typing"
                   for name, value in vars(cls).items() if inspect.isfunction(value) and not name.startswith("_")})


def test_every_family_is_served():
    assert set(SERVING) == {family.name for family in FAMILIES}
    assert all(SERVING[family.name].family is family for family in FAMILIES)


@pytest.mark.parametrize(("kind", "input_type"), [(k, f.input_type) for f in FAMILIES for k in f.kinds])
def test_every_kind_has_a_deployment_and_a_loader(kind, input_type):
    from ray.serve import Deployment

    served = serving_family(manifest(kind, input_type))
    assert isinstance(served, ServingFamily) and served.family is family_of(kind, input_type)
    assert isinstance(served.deployment(), Deployment)
    assert list(inspect.signature(served.loader()).parameters)[:3] == ["path", "runtime", "device"]


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_each_deployment_keeps_its_replica_contract(family):
    """The class behind each deployment has every method of its contract with the same parameters (names, order,
    defaults) and the same async-ness: only optional parameters may ever be added, never removed or reordered."""
    served = SERVING[family]
    cls = served.deployment().func_or_class
    assert issubclass(cls, served.contract) and issubclass(cls, Replica)
    for name in contract_methods(served.contract):
        want, got = getattr(served.contract, name), getattr(cls, name)
        want_params = list(inspect.signature(want).parameters.values())
        got_params = list(inspect.signature(got).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got_params[:len(want_params)]] == \
               [(p.name, p.kind, p.default) for p in want_params], f"{cls.__name__}.{name}"
        assert all(p.default is not inspect.Parameter.empty for p in got_params[len(want_params):]), \
            f"{cls.__name__}.{name}: parameters past the contract's must be optional"
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), f"{cls.__name__}.{name}"


def test_the_contracts_and_their_call_shapes():
    assert SERVING[TEXT.name].contract is TextReplica and SERVING[RECORDS.name].contract is RecordsReplica
    assert SERVING[IMAGE.name].contract is SERVING[LATENT.name].contract is ImageReplica
    # One call shape for pixel and latent image models: the API calls both the same way.
    assert list(inspect.signature(ImageReplica.score).parameters) == [
        "self", "images", "labels", "per_pixel", "samples", "seed"]
    assert list(inspect.signature(ImageReplica.sample).parameters) == ["self", "n", "labels", "seed"]
    assert list(inspect.signature(RecordsReplica.score).parameters) == ["self", "records"]
    assert list(inspect.signature(TextReplica.score).parameters) == ["self", "token_lists"]
    assert contract_methods(Replica) == ["info", "ready", "reconfigure"]


def test_deployments_are_named_as_deployments():
    names = {family: served.deployment_path.split(":")[1] for family, served in SERVING.items()}
    assert names == {"text": "TextDeployment", "image": "ImageDeployment", "latent": "LatentImageDeployment",
                     "records": "RecordsDeployment"}


@pytest.mark.parametrize(("kind", "input_type", "family"), [
    ("realnvp", "image", "latent"), ("realnvp", "records", "records"), ("pixelcnn", "image", "image"),
    ("vae", "image", "latent"), ("gpt", "text", "text"), ("gmm", "records", "records")])
def test_kind_and_input_type_name_the_family(kind, input_type, family):
    assert serving_family(manifest(kind, input_type)).name == family


@pytest.mark.parametrize(("kind", "input_type"), [("pixelcnn", "records"), ("gmm", "image"), ("bert", "text")])
def test_a_kind_no_family_has_with_its_input_is_an_artifact_error(kind, input_type):
    with pytest.raises(art.ArtifactError, match=f"model 'm': no model family has kind {kind!r}"):
        serving_family(manifest(kind, input_type))


def test_require_family_names_the_manifest(tmp_path):
    loaded = SimpleNamespace(path=tmp_path, manifest=manifest("gmm", "records"))
    require_family(loaded, RECORDS)
    with pytest.raises(art.ArtifactError, match=r"manifest\.json: kind 'gmm' with 'records' input is not of the image"):
        require_family(loaded, IMAGE)


def test_onnx_sessions_use_cuda_only_when_asked_for_and_present():
    import onnxruntime as ort

    assert providers_for("cpu") == [CPU_PROVIDER]
    has_cuda = CUDA_PROVIDER in ort.get_available_providers()
    assert providers_for("cuda") == ([CUDA_PROVIDER, CPU_PROVIDER] if has_cuda else [CPU_PROVIDER])
