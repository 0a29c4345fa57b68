"""The data plane's fast paths give what the paths they replace gave, bit for bit, and the same errors: orjson
bodies against json.loads, records and images checked whole against item by item, arrays in v2 responses against
lists."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from genserve.service.api import fast_json
from genserve.service.api.v2.tensors import encode_response
from genserve.service.errors import InvalidInput
from genserve.service.services.images import ImageService
from genserve.service.services.records import RecordsService

BODIES = [
    b'{"records": [[1.5, -0.0, 3, 1e-310, 1.7976931348623157e308, 0.1, 2.5e-8]]}',
    b'{"a": 1, "a": 2, "nested": {"x": [true, false, null, "s\\u00e9\\n"]}}',
    b'{"prompt": "caf\xc3\xa9 \\ud83d\\ude00", "n": 18446744073709551615}',
    b'{"records": [[NaN, Infinity, -Infinity]]}',  # orjson refuses: json reads them, pydantic refuses them
    b'{"big": 123456789012345678901234567890}',  # past 64 bits: orjson reads a float, json an int
    b'[18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809]',
    b'[1e400, -1e400, 0.00012345678901234567, -0.0012345678901234567]',
    b'{"lone": "\\ud800"}',  # a lone surrogate: orjson refuses, json reads it
    b'[1, 2.0, -3e2]',
]


@pytest.mark.parametrize("body", BODIES)
def test_fast_json_reads_every_body_as_json_loads(body: bytes) -> None:
    expected, got = json.loads(body), fast_json.loads(body)
    assert repr(got) == repr(expected)  # same values and types (1 vs 1.0, -0.0), NaN included


@pytest.mark.parametrize("body", [b'{"records": [[1, 2]', b"", b'{"a": 01}', b"\xff\xfe"])
def test_fast_json_raises_what_json_loads_raises(body: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(body)
    with pytest.raises(Exception) as got:
        fast_json.loads(body)
    assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)


def test_fast_json_floats_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(20_000) * 10.0 ** rng.integers(-300, 300, 20_000)
    body = json.dumps(values.tolist()).encode()
    assert fast_json.loads(body) == json.loads(body) == values.tolist()


def records_service(n_features: int = 3, limit: int = 100) -> RecordsService:
    manifest = SimpleNamespace(input=SimpleNamespace(n_features=n_features, feature_names=["a", "b", "c"]))
    catalog = SimpleNamespace(records_model=lambda name: manifest,
                              limits=SimpleNamespace(max_records_per_request=limit))
    return RecordsService(catalog)


def test_records_checked_whole_equal_records_checked_one_by_one() -> None:
    rows = np.random.default_rng(2).standard_normal((50, 3)).tolist()
    service = records_service()
    as_list = service.records("m", rows)
    as_array = service.records("m", np.asarray(rows, dtype=np.float32))
    assert as_list.dtype == np.float64 and as_list.tobytes() == np.asarray(rows, dtype=np.float64).tobytes()
    assert as_array.tobytes() == np.asarray(np.asarray(rows, dtype=np.float32), dtype=np.float64).tobytes()
    assert service.records("m", [[1, 2, 3]]).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize(("rows", "message"), [
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], "records[1] has 2 features; model 'm' expects 3 (a, b, c), in that order"),
    ([[1.0, 2.0], [1.0, 2.0]], "records[0] has 2 features; model 'm' expects 3 (a, b, c), in that order"),
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], "records[1] has 4 features"),
    ([[1.0, 2.0, 3.0], [1.0, float("nan"), 3.0]], "records[1][1] is nan; records hold finite numbers"),
])
def test_records_errors_name_the_same_record(rows: list, message: str) -> None:
    for given in (rows, np.asarray(rows) if len({len(r) for r in rows}) == 1 else rows):
        with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            records_service().records("m", given)


def image_service(levels: int = 4) -> ImageService:
    manifest = SimpleNamespace(input=SimpleNamespace(height=2, width=3, levels=levels))
    catalog = SimpleNamespace(manifest=lambda name: manifest, limits=SimpleNamespace(max_images_per_request=64))
    return ImageService(catalog)


def test_images_checked_whole_equal_images_checked_row_by_row() -> None:
    images = np.random.default_rng(3).integers(0, 4, (10, 2, 3))
    service = image_service()
    for dtype in (np.uint8, np.int64, np.int32):
        got = service.images("m", images.astype(dtype))
        assert got.dtype == np.int64 and np.array_equal(got, service.images("m", images.tolist()))


@pytest.mark.parametrize("bad", [(4, "images\\[1\\] row 0 column 2: 4 is out of range"),
                                 (-1, "images\\[1\\] row 0 column 2: -1 is out of range")])
def test_images_errors_name_the_same_pixel(bad: tuple[int, str]) -> None:
    images = np.zeros((3, 2, 3), dtype=np.int64)
    images[1, 0, 2] = bad[0]
    for given in (images, images.tolist()):
        with pytest.raises(InvalidInput, match=bad[1]):
            image_service().images("m", given)


def test_v2_columns_as_arrays_encode_as_lists_did() -> None:
    log_prob = np.random.default_rng(4).standard_normal(100) * 1e3
    wanted = [("log_prob", False)], [("log_prob", True)]
    for outputs in wanted:
        from_array = encode_response({"model_name": "m"}, {"log_prob": log_prob}, outputs)
        from_list = encode_response({"model_name": "m"}, {"log_prob": log_prob.tolist()}, outputs)
        assert from_array.body == from_list.body and dict(from_array.headers) == dict(from_list.headers)
