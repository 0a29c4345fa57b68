"""Latent-variable image models over HTTP: a VAE's bounds (K per request, seeded), samples, reconstructions and
interpolations, and the clear 400s for what a VAE cannot do (completion, per-pixel values)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.models.registry import build_latent_model
from tests.service.conftest import DIGITS_TRAIN, FLOW, GAN, IMAGE_COND, IMAGE_FLOW, VAE, Server, digits

pytestmark = pytest.mark.integration


def post(server: Server, path: str, body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def held_out(n: int = 4) -> list:
    images, _ = digits()
    return images[DIGITS_TRAIN:DIGITS_TRAIN + n].tolist()


def in_process(server: Server):
    loaded = art.load_artifact(art.resolve(server.store, VAE))
    module = build_latent_model("vae", loaded.manifest.config)
    art.load_module_weights(module, loaded.contents[art.WEIGHTS])
    return module.eval(), loaded.manifest


def test_a_vae_answers_with_a_bound_on_log_p_seeded_and_tightened_by_k(server: Server) -> None:
    module, manifest = in_process(server)
    x = held_out()
    r = post(server, f"/v1/models/{VAE}/log_prob", {"images": x})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["density"] == "bound" and body["per_pixel"] is None
    # The model's K (its calibration's) with seed 0 by default: what the module gives in process.
    want = module.importance_bound(torch.tensor(x), manifest.metrics["score_samples"],
                                   torch.Generator().manual_seed(0))
    np.testing.assert_allclose(body["log_prob"], want.double().numpy(), rtol=1e-5)
    again = post(server, f"/v1/models/{VAE}/log_prob", {"images": x}).json()["log_prob"]
    assert again == body["log_prob"]
    other = post(server, f"/v1/models/{VAE}/log_prob", {"images": x, "seed": 7}).json()["log_prob"]
    assert other != body["log_prob"]
    k1 = post(server, f"/v1/models/{VAE}/log_prob", {"images": x, "importance_samples": 1}).json()["log_prob"]
    k1000 = post(server, f"/v1/models/{VAE}/log_prob", {"images": x, "importance_samples": 1000}).json()["log_prob"]
    assert np.mean(k1000) > np.mean(k1)  # the importance-weighted bound tightens with K
    anomaly = post(server, f"/v1/models/{VAE}/anomaly", {"images": x}).json()
    assert anomaly["density"] == "bound" and anomaly["score_type"] == "ensemble" and len(anomaly["results"]) == 4


def test_vae_samples_reconstructions_and_interpolations(server: Server) -> None:
    a = post(server, f"/v1/models/{VAE}/sample", {"n": 3, "seed": 5}).json()
    b = post(server, f"/v1/models/{VAE}/sample", {"n": 3, "seed": 5}).json()
    assert a == b and len(a["images"]) == 3
    image = np.asarray(a["images"][0]["array"])
    assert image.shape == (8, 8) and image.min() >= 0 and image.max() < 17 and a["images"][0]["log_prob"] < 0
    x = held_out(2)
    module, _ = in_process(server)
    r = post(server, f"/v1/models/{VAE}/reconstruct", {"images": x}).json()
    np.testing.assert_array_equal([i["array"] for i in r["images"]], module.reconstruct(torch.tensor(x)).numpy())
    path = post(server, f"/v1/models/{VAE}/interpolate", {"images": x, "steps": 5, "format": "png"}).json()
    assert len(path["images"]) == 5 and all(i["png"] and i["log_prob"] is None for i in path["images"])


@pytest.mark.parametrize(("path", "body", "words"), [
    (f"/v1/models/{VAE}/complete", {"images": [[[0] * 8] * 8], "known_rows": 4}, "completion needs a model that"),
    (f"/v1/models/{VAE}/log_prob", {"images": [[[0] * 8] * 8], "per_pixel": True}, "per_pixel needs a model"),
    (f"/v1/models/{VAE}/log_prob", {"images": [[[0] * 8] * 8], "importance_samples": 1001}, "less than or equal"),
    (f"/v1/models/{IMAGE_COND}/log_prob", {"images": [[[0] * 8] * 8], "importance_samples": 4},
     "whose log_prob is exact"),
    (f"/v1/models/{FLOW}/log_prob", {"records": [[1.0] * 13], "seed": 1}, "are for models whose density is a bound"),
    (f"/v1/models/{IMAGE_COND}/reconstruct", {"images": [[[0] * 8] * 8]}, "it is for VAEs"),
    (f"/v1/models/{VAE}/interpolate", {"images": [[[0] * 8] * 8]}, "at least 2"),
])
def test_what_a_vae_cannot_do_is_a_clear_400(server: Server, path, body, words) -> None:
    r = post(server, path, body)
    assert r.status_code in (400, 422), r.text
    assert words in r.json()["error"]["message"], r.json()


def test_a_gan_only_samples_and_says_so(server: Server) -> None:
    info = httpx.get(f"{server.url}/v1/models/{GAN}").json()
    assert info["kind"] == "gan" and info["density"] == "none" and info["calibration"] is None
    a = post(server, f"/v1/models/{GAN}/sample", {"n": 4, "label": 3, "seed": 1}).json()
    b = post(server, f"/v1/models/{GAN}/sample", {"n": 4, "label": 3, "seed": 1}).json()
    assert a == b and [i["label"] for i in a["images"]] == [3] * 4
    assert all(i["log_prob"] is None for i in a["images"])  # no density to give
    drawn = post(server, f"/v1/models/{GAN}/sample", {"n": 6, "seed": 2}).json()
    assert all(0 <= i["label"] < 10 for i in drawn["images"])  # labels from the class prior
    x = held_out(1)
    for path, body in ((f"/v1/models/{GAN}/log_prob", {"images": x}),
                       (f"/v1/models/{GAN}/anomaly", {"images": x}),
                       (f"/v1/models/{GAN}/complete", {"images": x, "known_rows": 2}),
                       (f"/v1/models/{GAN}/reconstruct", {"images": x})):
        r = post(server, path, body)
        assert r.status_code == 400, (path, r.text)
    r = post(server, f"/v1/models/{GAN}/log_prob", {"images": x})
    assert r.json()["error"]["type"] == "density_unavailable"
    assert "it can only sample" in r.json()["error"]["message"]


def test_an_image_flow_gives_its_dequantisation_bound(server: Server) -> None:
    loaded = art.load_artifact(art.resolve(server.store, IMAGE_FLOW))
    module = build_latent_model("realnvp", loaded.manifest.config)
    art.load_module_weights(module, loaded.contents[art.WEIGHTS])
    module.eval()
    info = httpx.get(f"{server.url}/v1/models/{IMAGE_FLOW}").json()
    assert info["kind"] == "realnvp" and info["density"] == "bound" and info["input"]["type"] == "image"
    x = held_out(3)
    body = post(server, f"/v1/models/{IMAGE_FLOW}/log_prob", {"images": x, "importance_samples": 8}).json()
    want = module.importance_bound(torch.tensor(x), 8, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(body["log_prob"], want.double().numpy(), rtol=1e-5)
    assert body["density"] == "bound"
    sampled = post(server, f"/v1/models/{IMAGE_FLOW}/sample", {"n": 2, "seed": 4}).json()
    assert len(sampled["images"]) == 2 and all(i["log_prob"] < 0 for i in sampled["images"])
    assert post(server, f"/v1/models/{IMAGE_FLOW}/complete", {"images": x, "known_rows": 2}).status_code == 400
    anomaly = post(server, f"/v1/models/{IMAGE_FLOW}/anomaly", {"images": x}).json()
    assert anomaly["density"] == "bound" and len(anomaly["results"]) == 3

