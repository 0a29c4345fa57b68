"""Image serving without a server: the torch and ONNX Runtime scorers, the sampler the deployment runs, and the
codec that turns the API's arrays and PNGs into images and back."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from genserve.artifacts import artifact as art
from genserve.artifacts.calibration import Calibration
from genserve.models.fvsbn import FVSBN, FVSBNConfig
from genserve.service.image import draw_images, score_requests
from genserve.service.image_codec import (
    DATA_URL_PREFIX,
    ImageInputError,
    bytes_from_levels,
    decode_image,
    encode_png,
    levels_from_bytes,
    png_to_levels,
)
from genserve.service.image_runtime import load_image_model
from genserve.training.onnx_export import export_image_onnx

torch.set_num_threads(1)

H, W, LEVELS, CLASSES = 4, 3, 5, 3


def random_fvsbn(height: int, width: int, levels: int, n_classes: int, seed: int = 0) -> FVSBN:
    torch.manual_seed(seed)
    model = FVSBN(FVSBNConfig(height=height, width=width, levels=levels, n_classes=n_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
        if n_classes:
            model.set_class_prior(torch.tensor([0, 0, 0, *range(n_classes)]))  # class 0 the likeliest
    return model.eval()


def write(store, name: str, model: FVSBN, onnx: bool) -> str:
    c = model.config
    files = {art.WEIGHTS: art.module_weights(model),
             art.CALIBRATION: json.dumps(Calibration.fit(np.arange(10.0)).to_dict()).encode()}
    if onnx:
        files[art.ONNX] = export_image_onnx(model)
    spec = art.ImageInputSpec(height=c.height, width=c.width, levels=c.levels, n_classes=c.n_classes)
    return str(art.write_artifact(store, kind="fvsbn", name=name, config=dataclasses.asdict(c), input_spec=spec,
                                  training={}, metrics={}, files=files))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("store")
    cond = random_fvsbn(H, W, LEVELS, CLASSES)
    binary = random_fvsbn(3, 3, 2, 0, seed=1)
    return {"cond": write(store, "cond", cond, onnx=True), "bin": write(store, "bin", binary, onnx=True),
            "bin-torch": write(store, "bin-torch", binary, onnx=False)}


def random_images(n: int, height: int = H, width: int = W, levels: int = LEVELS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, levels, (n, height, width))


# ---- runtimes ---------------------------------------------------------------------------------------


def test_onnx_matches_torch_with_labels_and_for_the_marginal(artifacts) -> None:
    torch_rt = load_image_model(artifacts["cond"], "torch", device="cpu")
    onnx_rt = load_image_model(artifacts["cond"], "onnx", device="cpu")
    assert torch_rt.runtime.name == "torch" and onnx_rt.runtime.name == "onnx"
    auto = load_image_model(artifacts["cond"])  # auto with a graph: the faster of the two, timed at load
    assert auto.runtime.name in ("torch", "onnx") and set(auto.choice.seconds) == {"torch", "onnx"}
    x = random_images(7)
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    for y in (labels, None):
        lp_t, px_t = torch_rt.runtime.score(x, y)
        lp_o, px_o = onnx_rt.runtime.score(x, y)
        assert lp_t.dtype == lp_o.dtype == np.float64 and px_t.shape == px_o.shape == (7, H, W)
        np.testing.assert_allclose(lp_o, lp_t, atol=1e-4)
        np.testing.assert_allclose(px_o, px_t, atol=1e-4)
        np.testing.assert_allclose(px_o.sum((1, 2)), lp_o, atol=1e-4)
    # The marginal really is log sum_y p(y) p(x | y), and differs from any one class's score.
    module = torch_rt.module
    with torch.no_grad():
        per_class = torch.stack([module.log_prob(torch.as_tensor(x), torch.full((7,), y)) for y in range(CLASSES)])
        want = torch.logsumexp(per_class + module.class_log_prior[:, None], 0).numpy()
    np.testing.assert_allclose(onnx_rt.runtime.score(x, None)[0], want, atol=1e-4)
    assert not np.allclose(onnx_rt.runtime.score(x, None)[0], onnx_rt.runtime.score(x, labels)[0])


def test_unconditional_runtimes_agree_and_auto_without_a_graph_is_torch(artifacts) -> None:
    x = random_images(5, 3, 3, 2)
    a = load_image_model(artifacts["bin"], "onnx", device="cpu")
    b = load_image_model(artifacts["bin-torch"], "auto", device="cpu")
    assert a.runtime.name == "onnx" and b.runtime.name == "torch" and a.calibration is not None
    assert b.choice.requested == "auto" and b.choice.seconds == {}  # nothing to choose from: nothing timed
    np.testing.assert_allclose(a.runtime.score(x, None)[0], b.runtime.score(x, None)[0], atol=1e-4)
    with pytest.raises(art.ArtifactError, match=r"no model\.onnx"):
        load_image_model(artifacts["bin-torch"], "onnx")


def test_artifact_whose_config_does_not_fit_its_input_spec_is_refused(artifacts, tmp_path) -> None:
    model = random_fvsbn(3, 3, 2, 0)
    spec = art.ImageInputSpec(height=3, width=4, levels=2)
    path = art.write_artifact(tmp_path, kind="fvsbn", name="bad", config=dataclasses.asdict(model.config),
                              input_spec=spec, training={}, metrics={},
                              files={art.WEIGHTS: art.module_weights(model)})
    with pytest.raises(art.ArtifactError, match="differ from the input spec"):
        load_image_model(path)


def test_batched_requests_with_and_without_labels_score_as_alone(artifacts) -> None:
    loaded = load_image_model(artifacts["cond"], "onnx", device="cpu")
    requests = [(random_images(2, seed=1), np.array([0, 2])), (random_images(3, seed=2), None),
                (random_images(1, seed=3), np.array([1])), (random_images(2, seed=4), None)]
    batched = score_requests(loaded, requests)
    for (x, y), (lp, px) in zip(requests, batched, strict=True):
        alone_lp, alone_px = loaded.runtime.score(x, y)
        np.testing.assert_allclose(lp, alone_lp, atol=1e-9)
        np.testing.assert_allclose(px, alone_px, atol=1e-9)


# ---- sampling and completion ----------------------------------------------------------------------------


def test_sampling_is_seeded_and_reports_exact_log_probs(artifacts) -> None:
    module = load_image_model(artifacts["cond"], "torch", device="cpu").module
    a = draw_images(module, 6, None, seed=3)
    b = draw_images(module, 6, None, seed=3)
    c = draw_images(module, 6, None, seed=4)
    assert a["images"].shape == (6, H, W) and a["images"].dtype == np.int64
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].min() >= 0 and a["images"].max() < LEVELS
    with torch.no_grad():
        want = module.log_prob(torch.as_tensor(a["images"]), torch.as_tensor(a["labels"])).double().numpy()
    np.testing.assert_allclose(a["log_prob"], want, atol=1e-6)
    given = draw_images(module, 4, np.array([2, 2, 0, 1]), seed=0)
    assert given["labels"].tolist() == [2, 2, 0, 1]
    unconditional = draw_images(load_image_model(artifacts["bin"], device="cpu").module, 3, None, seed=0)
    assert unconditional["labels"] is None and unconditional["images"].shape == (3, 3, 3)


def test_completion_keeps_the_known_prefix(artifacts) -> None:
    module = load_image_model(artifacts["cond"], "torch", device="cpu").module
    prefix = np.repeat(random_images(2, seed=5), 3, axis=0)
    for known in (0, 4, 7, H * W):
        for labels in (None, np.array([0, 0, 0, 2, 2, 2])):
            out = draw_images(module, len(prefix), labels, seed=1, prefix=prefix, known=known)
            flat, want = out["images"].reshape(6, -1), prefix.reshape(6, -1)
            assert np.array_equal(flat[:, :known], want[:, :known])
            assert out["labels"].shape == (6,)
    full = draw_images(module, 6, None, seed=1, prefix=prefix, known=H * W)
    assert np.array_equal(full["images"], prefix)


# ---- codec ------------------------------------------------------------------------------------------


def png_b64(pixels: np.ndarray, mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("levels", [2, 5, 17, 255, 256])
def test_png_round_trips_exactly(levels: int) -> None:
    image = random_images(1, 6, 7, levels, seed=levels)[0]
    encoded = encode_png(image, levels)
    assert np.array_equal(decode_image(encoded, "images[0]", 6, 7, levels), image)
    assert np.array_equal(decode_image(DATA_URL_PREFIX + encoded, "images[0]", 6, 7, levels), image)
    assert np.array_equal(png_to_levels(encoded, levels), image)
    assert np.array_equal(levels_from_bytes(bytes_from_levels(image, levels), levels), image)


def test_png_modes_and_value_mapping() -> None:
    grey = np.array([[0, 127, 128], [255, 16, 240]], dtype=np.uint8)
    assert decode_image(png_b64(grey), "i", 2, 3, 17).tolist() == [[0, 8, 8], [16, 1, 15]]
    bits = png_b64(np.array([[0, 255, 0]], dtype=np.uint8), mode="1")
    assert decode_image(bits, "i", 1, 3, 2).tolist() == [[0, 1, 0]]
    assert decode_image([[1, 0, 1]], "i", 1, 3, 2).tolist() == [[1, 0, 1]]


ARRAY_ERRORS = [
    ([[0, 1, 2]], "wrong_image_shape", ["images[2]", "1 rows", "4x3"]),
    ([[0, 1, 2]] * 3 + [[0, 1]], "wrong_image_shape", ["images[2] row 3 has 2 values", "4x3"]),
    ([[0, 1, 2]] * 3 + [5], "wrong_image_shape", ["images[2] row 3 is a number"]),
    ([[0, 1, 2]] * 3 + [[0, 1, 5]], "invalid_image", ["images[2] row 3 column 2: 5 is out of range", "[0, 4]"]),
    ([[0, -1, 2]] * 4, "invalid_image", ["row 0 column 1: -1 is out of range"]),
    ([[0, 1, 2.5]] * 4, "invalid_image", ["row 0 column 2: 2.5 is not an integer"]),
    ([[0, 1, 2.0]] * 4, "invalid_image", ["2.0 is not an integer"]),
    ([[0, True, 2]] * 4, "invalid_image", ["true is not an integer"]),
    ([[0, "1", 2]] * 4, "invalid_image", ["'1' is not an integer"]),
    ([[0, None, 2]] * 4, "invalid_image", ["null is not an integer"]),
    (7, "invalid_image", ["images[2] is a number", "list of 4 rows of 3"]),
    ({"a": 1}, "invalid_image", ["images[2] is a object"]),
]


@pytest.mark.parametrize(("value", "type_", "words"), ARRAY_ERRORS)
def test_array_errors_name_the_image_row_column_and_value(value, type_, words) -> None:
    with pytest.raises(ImageInputError) as err:
        decode_image(value, "images[2]", H, W, LEVELS)
    assert err.value.type == type_
    for word in words:
        assert word in err.value.message, err.value.message


def test_pixels_after_the_known_prefix_are_ignored() -> None:
    partial = [[1, 2, 3], [4, None, -7], [None] * 3, [99] * 3]
    got = decode_image(partial, "images[0]", H, W, LEVELS, known=4)
    assert got.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ImageInputError, match="row 1 column 1: null is not an integer"):
        decode_image(partial, "images[0]", H, W, LEVELS, known=5)
    with pytest.raises(ImageInputError, match="must be integers or null"):
        decode_image([[1, 2, 3], [4, 0.5, 0], [0] * 3, [0] * 3], "images[0]", H, W, LEVELS, known=4)
    png = encode_png(np.full((H, W), 3), LEVELS)
    assert decode_image(png, "images[0]", H, W, LEVELS, known=2).reshape(-1).tolist() == [3, 3] + [0] * 10


PNG_ERRORS = [
    ("not base64!!", "invalid_image", ["images[1] is a string but not valid base64"]),
    (base64.b64encode(b"GIF89a....").decode(), "invalid_image", ["not a PNG"]),
    (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).decode(), "invalid_image", ["not a readable PNG"]),
    ("data:image/jpeg;base64,AAAA", "invalid_image", ["data URLs must be data:image/png;base64"]),
    (png_b64(np.zeros((H, W, 3), dtype=np.uint8), "RGB"), "invalid_image", ["mode 'RGB'", "'L'", "'1'"]),
    (png_b64(np.zeros((H, W), dtype=np.uint8), "P"), "invalid_image", ["mode 'P'"]),
    (png_b64(np.zeros((H, W), dtype=np.uint8), "LA"), "invalid_image", ["mode 'LA'"]),
    (png_b64(np.zeros((5, 5), dtype=np.uint8)), "wrong_image_shape", ["5x5 PNG", "3x4"]),
]


@pytest.mark.parametrize(("value", "type_", "words"), PNG_ERRORS)
def test_png_errors_are_clear(value, type_, words) -> None:
    with pytest.raises(ImageInputError) as err:
        decode_image(value, "images[1]", H, W, LEVELS)
    assert err.value.type == type_
    for word in words:
        assert word in err.value.message, err.value.message


def test_png_size_is_checked_before_decoding_pixels() -> None:
    # A valid header that claims a 20000x20000 image, over 1x1 pixel data: refused from the header alone.
    huge = png_b64(np.zeros((1, 1), dtype=np.uint8))
    data = bytearray(base64.b64decode(huge))
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC over type and data
    with pytest.raises(ImageInputError) as err:
        decode_image(base64.b64encode(bytes(data)).decode(), "images[0]", H, W, LEVELS)
    assert err.value.type == "wrong_image_shape" and "20000x20000 PNG" in err.value.message
    with pytest.raises(ImageInputError, match="at most 256 levels"):
        decode_image(huge, "images[0]", 1, 1, 300)


# ---- every image kind through the same serving path ----------------------------------------------------

TINY_ARCHITECTURES = {
    "pixelcnn": {"channels": 4, "n_layers": 2, "kernel_size": 3, "head_channels": 4},
    "made": {"hidden": (16,), "n_masks": 3},
    "nade": {"hidden": 8},
    "fvsbn": {},
}


@pytest.mark.parametrize("kind", sorted(TINY_ARCHITECTURES))
def test_every_kind_scores_alike_in_torch_and_onnx_and_samples(tmp_path, kind: str) -> None:
    from genserve.models.registry import build_image_model

    torch.manual_seed(0)
    model = build_image_model(kind, {"height": H, "width": W, "levels": LEVELS, "n_classes": CLASSES,
                                     **TINY_ARCHITECTURES[kind]}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    spec = art.ImageInputSpec(height=H, width=W, levels=LEVELS, n_classes=CLASSES)
    path = art.write_artifact(tmp_path, kind=kind, name="m", config=dataclasses.asdict(model.config),
                              input_spec=spec, training={}, metrics={},
                              files={art.WEIGHTS: art.module_weights(model), art.ONNX: export_image_onnx(model)})
    images, labels = random_images(6), np.array([0, 1, 2, 2, 1, 0])
    in_torch = load_image_model(str(path), runtime="torch", device="cpu")
    in_onnx = load_image_model(str(path), runtime="onnx", device="cpu")
    for given in (labels, None):  # given labels, and the marginal over them
        (lp_t, px_t), (lp_o, px_o) = in_torch.runtime.score(images, given), in_onnx.runtime.score(images, given)
        np.testing.assert_allclose(lp_o, lp_t, atol=1e-4)
        np.testing.assert_allclose(px_o, px_t, atol=1e-4)
    drawn = draw_images(in_torch.module, 4, None, seed=3)
    again = draw_images(in_torch.module, 4, None, seed=3)
    assert np.array_equal(drawn["images"], again["images"]) and drawn["images"].shape == (4, H, W)
    np.testing.assert_allclose(drawn["log_prob"], in_torch.runtime.score(drawn["images"], drawn["labels"])[0],
                               atol=1e-5)
    done = draw_images(in_torch.module, 6, labels, seed=4, prefix=images, known=5)
    assert np.array_equal(done["images"].reshape(6, -1)[:, :5], images.reshape(6, -1)[:, :5])
