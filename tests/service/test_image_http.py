"""The image endpoints over real HTTP on loopback, against the session's Ray Serve instance (see conftest):
`digits-cond` (class-conditional, served by ONNX Runtime) and `tiny-bin` (unconditional, binary, torch)."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from genserve.artifacts import artifact as art
from genserve.service.client import AsyncGenserveClient, GenserveClient, GenserveError
from genserve.service.image_codec import encode_png, png_to_levels
from genserve.service.image_runtime import load_image_model
from tests.service.conftest import DIGITS_TRAIN, IMAGE_BIN, IMAGE_COND, MAX_IMAGES, SINGLE, TEXT, Server, digits

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(server: Server) -> GenserveClient:
    with GenserveClient(server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(server: Server):
    """The served artifacts loaded in this process, in torch."""
    return {name: load_image_model(art.resolve(server.store, name), runtime="torch", device="cpu")
            for name in (IMAGE_COND, IMAGE_BIN)}


def heldout(n: int = 12, binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits(binary)
    return images[DIGITS_TRAIN:DIGITS_TRAIN + n], labels[DIGITS_TRAIN:DIGITS_TRAIN + n]


def post(server: Server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


# ---- discovery ---------------------------------------------------------------------------------------


def test_image_models_are_described(server: Server, client: GenserveClient) -> None:
    cond, binary = client.model(IMAGE_COND), client.model(IMAGE_BIN)
    assert cond.kind == "fvsbn" and cond.runtime == "onnx" and binary.runtime == "torch"
    assert cond.input.type == "image" and (cond.input.height, cond.input.width, cond.input.levels) == (8, 8, 17)
    assert cond.input.n_classes == 10 and cond.input.class_names[3] == "3"
    assert binary.input.n_classes == 0 and binary.input.levels == 2 and binary.input.height == 6
    assert cond.calibration is not None and cond.limits.max_images_per_request == MAX_IMAGES
    assert client.ready().models[IMAGE_COND] is True
    assert "/v1/models/{name}/complete" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


# ---- sampling --------------------------------------------------------------------------------------------


def test_sample_is_seeded_and_shaped_in_both_formats(client: GenserveClient, local) -> None:
    a = client.sample_images(IMAGE_COND, n=5, seed=11)
    b = client.sample_images(IMAGE_COND, n=5, seed=11)
    c = client.sample_images(IMAGE_COND, n=5, seed=12)
    assert (a.height, a.width, a.levels) == (8, 8, 17) and len(a.images) == 5
    assert a == b and [i.array for i in a.images] != [i.array for i in c.images]
    arrays = np.array([i.array for i in a.images])
    assert arrays.shape == (5, 8, 8) and arrays.min() >= 0 and arrays.max() <= 16
    assert all(0 <= i.label <= 9 and i.png is None for i in a.images)
    # The log-probabilities are exact: log p(image | label) under the served model.
    labels = np.array([i.label for i in a.images])
    want = local[IMAGE_COND].runtime.score(arrays, labels)[0]
    np.testing.assert_allclose([i.log_prob for i in a.images], want, atol=1e-4)

    png = client.sample_images(IMAGE_COND, n=5, seed=11, format="png")
    assert all(i.array is None for i in png.images)
    assert np.array_equal(np.array([png_to_levels(i.png, 17) for i in png.images]), arrays)
    with Image.open(io.BytesIO(base64.b64decode(png.images[0].png))) as im:
        assert im.mode == "L" and im.size == (8, 8)

    unconditional = client.sample_images(IMAGE_BIN, n=3, seed=0)
    assert all(i.label is None for i in unconditional.images)
    assert np.isin(np.array([i.array for i in unconditional.images]), [0, 1]).all()


def test_png_samples_round_trip_through_log_prob(client: GenserveClient) -> None:
    sampled = client.sample_images(IMAGE_COND, n=4, seed=3, format="png")
    labels = [i.label for i in sampled.images]
    scored = client.log_prob_images(IMAGE_COND, [i.png for i in sampled.images], labels=labels)
    np.testing.assert_allclose(scored.log_prob, [i.log_prob for i in sampled.images], atol=1e-4)
    prefixed = client.log_prob_images(IMAGE_COND, ["data:image/png;base64," + sampled.images[0].png],
                                      labels=labels[:1])
    assert prefixed.log_prob[0] == pytest.approx(scored.log_prob[0], abs=1e-9)


def test_conditional_labels_are_honoured(client: GenserveClient) -> None:
    threes = client.sample_images(IMAGE_COND, n=6, seed=1, label=3)
    assert [i.label for i in threes.images] == [3] * 6
    mixed = client.sample_images(IMAGE_COND, n=3, seed=1, labels=[0, 7, 7])
    assert [i.label for i in mixed.images] == [0, 7, 7]
    # Class-conditional samples look like their class more than like any other: scored under each label, a
    # sample's own label wins most of the time.
    samples = [i.array for i in client.sample_images(IMAGE_COND, n=20, seed=5, label=0).images]
    scores = np.array([client.log_prob_images(IMAGE_COND, samples, labels=[y] * 20).log_prob for y in range(10)])
    assert (scores.argmax(0) == 0).mean() > 0.7


# ---- completion ------------------------------------------------------------------------------------------


def test_completion_keeps_the_known_prefix(client: GenserveClient, local) -> None:
    images, labels = heldout(2)
    res = client.complete(IMAGE_COND, images, known_rows=3, n=3, seed=4)
    assert res.known_pixels == 24 and len(res.completions) == 2 and all(len(c) == 3 for c in res.completions)
    for image, completions in zip(images, res.completions, strict=True):
        for c in completions:
            assert np.array_equal(np.array(c.array)[:3], image[:3]) and 0 <= c.label <= 9
    assert res == client.complete(IMAGE_COND, images, known_rows=3, n=3, seed=4)
    arrays = np.array([c.array for cs in res.completions for c in cs])
    want = local[IMAGE_COND].runtime.score(arrays, np.array([c.label for cs in res.completions for c in cs]))[0]
    np.testing.assert_allclose([c.log_prob for cs in res.completions for c in cs], want, atol=1e-4)

    # known_pixels: a raster-order prefix, mid-row; pixels after it may be anything (null here).
    partial = images.reshape(2, -1).tolist()
    partial = [[row[r * 8:(r + 1) * 8] for r in range(8)] for row in partial]
    for p in partial:
        p[1][5:] = [None] * 3
        p[7] = [None] * 8
    res = client.complete(IMAGE_COND, partial, known_pixels=13, n=2, seed=0, labels=labels.tolist(), format="png")
    for image, label, completions in zip(images, labels, res.completions, strict=True):
        for c in completions:
            got = png_to_levels(c.png, 17)
            assert np.array_equal(got.reshape(-1)[:13], image.reshape(-1)[:13]) and c.label == label
    full = client.complete(IMAGE_BIN, heldout(1, binary=True)[0], known_rows=6)
    assert np.array_equal(full.completions[0][0].array, heldout(1, binary=True)[0][0])


# ---- scoring ----------------------------------------------------------------------------------------------


def test_log_prob_matches_the_model_in_process(client: GenserveClient, local) -> None:
    images, labels = heldout(10)
    marginal = client.log_prob_images(IMAGE_COND, images, per_pixel=True)  # served by ONNX Runtime
    given = client.log_prob_images(IMAGE_COND, images, labels=labels.tolist(), per_pixel=True)
    model = local[IMAGE_COND]
    for got, y in ((marginal, None), (given, labels)):
        want_lp, want_px = model.runtime.score(images, y)  # torch, in this process
        np.testing.assert_allclose(got.log_prob, want_lp, atol=1e-4)
        np.testing.assert_allclose(got.per_pixel, want_px, atol=1e-4)
        np.testing.assert_allclose(np.array(got.per_pixel).sum((1, 2)), got.log_prob, atol=1e-4)
        np.testing.assert_allclose(got.bits_per_dim, -np.array(got.log_prob) / (64 * np.log(2)), rtol=1e-9)
    # log p(x) = log sum_y p(y) p(x | y) >= log p(y) + log p(x | y) for the true label.
    prior = model.module.class_log_prior.double().numpy()
    assert np.all(np.array(marginal.log_prob) >= prior[labels] + np.array(given.log_prob) - 1e-6)
    assert client.log_prob_images(IMAGE_COND, images[:2]).per_pixel is None

    binary, _ = heldout(5, binary=True)
    got = client.log_prob_images(IMAGE_BIN, binary)
    np.testing.assert_allclose(got.log_prob, local[IMAGE_BIN].runtime.score(binary, None)[0], atol=1e-5)
    as_png = client.log_prob_images(IMAGE_BIN, [encode_png(b, 2) for b in binary])
    np.testing.assert_allclose(as_png.log_prob, got.log_prob, atol=1e-9)


def test_anomaly_flags_noise_not_digits(client: GenserveClient, local) -> None:
    normal, _ = heldout(20)
    noise = np.random.default_rng(0).integers(0, 17, (3, 8, 8))
    res = client.anomaly_images(IMAGE_COND, np.concatenate([normal, noise]), score="nll")
    cal = local[IMAGE_COND].calibration.get("nll")
    assert res.threshold == pytest.approx(cal.threshold) and res.false_positive_rate == 0.01
    assert all(r.is_anomaly and r.percentile == 100.0 for r in res.results[20:])
    assert sum(r.is_anomaly for r in res.results[:20]) <= 2
    scores = np.array([r.score for r in res.results])
    np.testing.assert_allclose(scores, -local[IMAGE_COND].runtime.score(np.concatenate([normal, noise]), None)[0],
                               atol=1e-4)
    fixed = client.anomaly_images(IMAGE_BIN, heldout(2, binary=True)[0], threshold=-1.0, score="nll")
    assert fixed.threshold == -1.0 and all(r.is_anomaly for r in fixed.results)


def test_concurrent_requests_with_and_without_labels_batch_correctly(server: Server, client: GenserveClient) -> None:
    images, labels = heldout(16)
    chunks = [(images[i:i + 2], labels[i:i + 2].tolist() if i % 4 else None) for i in range(0, 16, 2)]
    sequential = [client.log_prob_images(IMAGE_COND, x, labels=y).log_prob for x, y in chunks]

    async def concurrently():
        async with AsyncGenserveClient(server.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.log_prob_images(IMAGE_COND, x, labels=y) for x, y in chunks * 3))

    for got, want in zip(asyncio.run(concurrently()), sequential * 3, strict=True):
        np.testing.assert_allclose(got.log_prob, want, atol=1e-9)


# ---- bad input ----------------------------------------------------------------------------------------------

ZEROS = [[0] * 8 for _ in range(8)]


def with_pixel(r: int, c: int, v) -> list[list]:
    image = [row[:] for row in ZEROS]
    image[r][c] = v
    return image


def png(pixels: np.ndarray, mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


C, B = f"/v1/models/{IMAGE_COND}", f"/v1/models/{IMAGE_BIN}"
BAD_IMAGE_REQUESTS = [
    # (path, body, status, error type, words the message must contain)
    (f"{C}/log_prob", {"images": [ZEROS, ZEROS[:7]]}, 400, "wrong_image_shape", ["images[1] has 7 rows", "8x8"]),
    (f"{C}/log_prob", {"images": [[[0] * 7, *ZEROS[1:]]]}, 400, "wrong_image_shape",
     ["images[0] row 0 has 7 values"]),
    (f"{C}/log_prob", {"images": [with_pixel(2, 5, 17)]}, 400, "invalid_image",
     ["images[0] row 2 column 5: 17 is out of range", "[0, 16]"]),
    (f"{C}/log_prob", {"images": [ZEROS, with_pixel(0, 1, -1)]}, 400, "invalid_image",
     ["images[1] row 0 column 1: -1"]),
    (f"{C}/anomaly", {"images": [with_pixel(4, 4, 1.5)]}, 400, "invalid_image",
     ["images[0] row 4 column 4: 1.5 is not an integer"]),
    (f"{C}/log_prob", {"images": [with_pixel(4, 4, "3")]}, 400, "invalid_image", ["'3' is not an integer"]),
    (f"{C}/log_prob", {"images": ["%%%"]}, 400, "invalid_image", ["images[0]", "not valid base64"]),
    (f"{C}/log_prob", {"images": [base64.b64encode(b"hello").decode()]}, 400, "invalid_image", ["not a PNG"]),
    (f"{C}/log_prob", {"images": [png(np.zeros((8, 8, 3)), "RGB")]}, 400, "invalid_image",
     ["mode 'RGB'", "'L' (8-bit grey) or '1'"]),
    (f"{C}/log_prob", {"images": [png(np.zeros((28, 28)))]}, 400, "wrong_image_shape",
     ["28x28 PNG", "are 8x8"]),
    (f"{C}/log_prob", {"images": [ZEROS], "labels": [10]}, 400, "invalid_label",
     ["labels[0]=10 is out of range", "0..9", "9=9"]),
    (f"{C}/log_prob", {"images": [ZEROS], "labels": [1, 2]}, 400, "invalid_label", ["2 entries", "one per image (1)"]),
    (f"{C}/log_prob", {"images": [ZEROS], "labels": ["1"]}, 422, "invalid_request", ["labels[0]", "integer"]),
    (f"{B}/log_prob", {"images": [[[0] * 6] * 6], "labels": [0]}, 400, "invalid_label",
     ["not class-conditional", "give no labels"]),
    (f"{C}/log_prob", {"images": [ZEROS] * (MAX_IMAGES + 1)}, 413, "limit_exceeded",
     [f"{MAX_IMAGES + 1} images", f"limit is {MAX_IMAGES}"]),
    (f"{C}/log_prob", {"images": []}, 422, "invalid_request", ["images", "at least 1"]),
    (f"{C}/log_prob", {"images": [ZEROS], "records": [[1.0]]}, 422, "invalid_request", ["exactly one of records"]),
    (f"{C}/log_prob", {"records": [[1.0] * 64]}, 400, "wrong_model_kind",
     ["records are for models of records", "image model", "/sample"]),
    (f"{C}/log_prob", {"images": [ZEROS], "responsibilities": True}, 400, "wrong_model_kind",
     ["responsibilities is for GMMs"]),
    (f"{C}/sample", {"n": MAX_IMAGES + 1}, 413, "limit_exceeded", [f"n={MAX_IMAGES + 1}", f"limit is {MAX_IMAGES}"]),
    (f"{C}/sample", {"n": 2, "labels": [1]}, 400, "invalid_label", ["labels has 1 entries", "(2)"]),
    (f"{C}/sample", {"n": 2, "label": 12}, 400, "invalid_label", ["label=12 is out of range"]),
    (f"{C}/sample", {"n": 2, "label": 1, "labels": [1, 1]}, 422, "invalid_request", ["not both"]),
    (f"{B}/sample", {"label": 0}, 400, "invalid_label", ["not class-conditional"]),
    (f"{C}/sample", {"format": "jpeg"}, 422, "invalid_request", ["format", "'array' or 'png'"]),
    (f"{C}/complete", {"images": [ZEROS], "known_rows": 9}, 400, "invalid_request",
     ["known_rows=9 is out of range", "8 rows", "0..8"]),
    (f"{C}/complete", {"images": [ZEROS], "known_pixels": 65}, 400, "invalid_request",
     ["known_pixels=65 is out of range", "0..64"]),
    (f"{C}/complete", {"images": [ZEROS], "known_rows": -1}, 422, "invalid_request", ["known_rows"]),
    (f"{C}/complete", {"images": [ZEROS], "known_rows": 2, "known_pixels": 3}, 422, "invalid_request",
     ["exactly one of known_rows or known_pixels"]),
    (f"{C}/complete", {"images": [ZEROS]}, 422, "invalid_request", ["exactly one of known_rows or known_pixels"]),
    (f"{C}/complete", {"images": [ZEROS] * 5, "known_rows": 2, "n": 13}, 413, "limit_exceeded",
     ["5 images x n=13 = 65", f"limit is {MAX_IMAGES}"]),
    (f"{C}/complete", {"images": [with_pixel(0, 3, 20)], "known_rows": 1}, 400, "invalid_image",
     ["images[0] row 0 column 3: 20"]),
    (f"{C}/complete", {"images": [ZEROS], "known_rows": 1, "labels": [-1]}, 400, "invalid_label", ["labels[0]=-1"]),
    (f"/v1/models/{TEXT}/complete", {"images": [ZEROS], "known_rows": 1}, 400, "wrong_model_kind",
     ["complete is for image models", "text model", f"/v1/models/{TEXT}/generate", IMAGE_COND]),
    (f"/v1/models/{SINGLE}/complete", {"images": [ZEROS], "known_rows": 1}, 400, "wrong_model_kind",
     ["complete is for image models", "model of records"]),
    (f"/v1/models/{TEXT}/log_prob", {"images": [ZEROS]}, 400, "wrong_model_kind", ["is a text model"]),
    (f"/v1/models/{TEXT}/sample", {"n": 1, "label": 1}, 400, "wrong_model_kind", ["is a text model"]),
    (f"/v1/models/{SINGLE}/log_prob", {"images": [ZEROS]}, 400, "wrong_model_kind",
     ["images is for image models", "model of records"]),
    (f"/v1/models/{SINGLE}/log_prob", {"records": [[1.0] * 13], "labels": [1]}, 400, "wrong_model_kind",
     ["labels is for image models"]),
    (f"/v1/models/{SINGLE}/log_prob", {"records": [[1.0] * 13], "per_pixel": True}, 400, "wrong_model_kind",
     ["per_pixel is for image models"]),
    (f"/v1/models/{SINGLE}/sample", {"n": 1, "format": "png"}, 400, "wrong_model_kind",
     ["format is for image models"]),
    (f"{C}/generate", {"prompt": "x"}, 400, "wrong_model_kind",
     ["image model", f"{C}/sample", "not a text model", TEXT]),
    (f"{C}/score", {"texts": ["x"]}, 400, "wrong_model_kind", ["image model", "not a text model"]),
    ("/v1/completions", {"model": IMAGE_COND, "prompt": "x"}, 400, "wrong_model_kind", ["image model"]),
]


@pytest.mark.parametrize(("path", "body", "status", "type_", "words"), BAD_IMAGE_REQUESTS,
                         ids=[f"{i}-{b[0].rsplit('/', 1)[-1]}-{b[3]}" for i, b in enumerate(BAD_IMAGE_REQUESTS)])
def test_bad_image_requests_get_a_clear_4xx(server: Server, path, body, status, type_, words) -> None:
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_, error
    for word in words:
        assert word in error["message"], error["message"]


def test_bad_requests_leave_the_replicas_serving(client: GenserveClient) -> None:
    with pytest.raises(GenserveError) as err:
        client.log_prob_images(IMAGE_COND, [with_pixel(0, 0, 99)])
    assert err.value.status_code == 400 and "row 0 column 0: 99" in err.value.message
    assert client.ready().ready
    assert len(client.sample_images(IMAGE_COND, n=MAX_IMAGES, seed=0).images) == MAX_IMAGES
