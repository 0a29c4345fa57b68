"""A small model of records scored in the Gateway (service/hosted.py): the same numbers as its replica's pass, a
large call off the event loop, a failure the request's alone, and the rule that decides what is hosted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

from genserve.service.hosted import INLINE_ITEMS, HostedRecordsModel, hosting_limit, probe_ms
from genserve.service.isolation import LOG_PROB_FLOOR, RequestFailed
from genserve.service.records import RecordsModelReplica
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return train_gmm(GMMTrainConfig(dataset="sklearn:wine", name="w", components=2, n_init=1),
                     tmp_path_factory.mktemp("store"), progress=False)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def replica(artifact: Path, request: pytest.FixtureRequest) -> RecordsModelReplica:
    loaded = RecordsModelReplica(str(artifact), request.param, "cpu")
    assert loaded.loaded.runtime.name == request.param
    return loaded


def test_hosted_calls_equal_the_replicas_pass(replica: RecordsModelReplica) -> None:
    hosted = HostedRecordsModel(replica, probe_ms(replica))
    assert 0 < hosted.call_ms < 1000
    wine = load_wine().data
    for x in (wine[:1], wine[:40], np.resize(wine, (INLINE_ITEMS + 1, 13))):  # the last runs in a worker thread
        log_prob, resp = asyncio.run(hosted.score(x))
        [(want_lp, want_resp)] = replica.score_records([x])
        np.testing.assert_array_equal(log_prob, want_lp)
        np.testing.assert_array_equal(resp, want_resp)
        np.testing.assert_array_equal(asyncio.run(hosted.reference_log_prob(x)), replica.reference_log_prob(x))
        np.testing.assert_array_equal(asyncio.run(hosted.knn_distance(x)), asyncio.run(replica.knn_distance(x)))
    np.testing.assert_array_equal(asyncio.run(hosted.sample(300, 4)), replica.sample(300, 4))


def test_a_hosted_request_that_underflows_gets_the_floor(replica: RecordsModelReplica) -> None:
    """As in a replica: a record whose density underflows scores LOG_PROB_FLOOR, the others as alone."""
    hosted = HostedRecordsModel(replica, 0.1)
    x = np.vstack([load_wine().data[:2], np.full((1, 13), 1e200)])
    log_prob, _ = asyncio.run(hosted.score(x))
    assert log_prob[2] == LOG_PROB_FLOOR
    np.testing.assert_array_equal(log_prob[:2], replica.score_records([x[:2]])[0][0])


def test_a_hosted_failure_is_the_requests_own(replica: RecordsModelReplica) -> None:
    """Records of the wrong width make the pass raise: that request gets RequestFailed (the catalog's
    model_error), and the next request is scored as ever."""
    hosted = HostedRecordsModel(replica, 0.1)
    with pytest.raises(RequestFailed, match="the model failed on this request"):
        asyncio.run(hosted.score(np.zeros((2, 5))))
    x = load_wine().data[:3]
    np.testing.assert_array_equal(asyncio.run(hosted.score(x))[0], replica.score_records([x])[0][0])


@pytest.mark.parametrize(("info", "limit"), [
    ({"runtime": "onnx", "device": "cpu", "options": {"score_in_gateway_below_ms": 1.0}}, 1.0),
    ({"runtime": "torch", "device": "cpu", "options": {"score_in_gateway_below_ms": 2.5}}, 2.5),
    ({"runtime": "onnx", "device": "cpu", "options": {"score_in_gateway_below_ms": 0}}, None),  # turned off
    ({"runtime": "torch", "device": "cuda", "options": {"score_in_gateway_below_ms": 1.0}}, None),  # a GPU's
    ({"runtime": "onnx", "device": "cpu"}, None),  # a replica from before the option
    ({"runtime": "unavailable"}, None),
])
def test_what_is_hosted(info: dict, limit: float | None) -> None:
    assert hosting_limit(info) == limit
