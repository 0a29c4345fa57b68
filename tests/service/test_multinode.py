"""A Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster: a head and worker nodes, each its own
raylet): genserve's application with replicas on different nodes, loaded from an s3:// store that each replica
fetches on its own node; a worker node is removed while a client keeps sending requests, and the replica comes back
on another node."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from genserve.artifacts.store import open_store
from genserve.training.gmm_pipeline import GMMTrainConfig, train_gmm
from tests.s3 import s3_server
from tests.service.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "wine"
SLOT = "genserve_replica_slot"  # a custom resource: one replica of MODEL per worker node
HEAD = "genserve_head"  # only the head node has it
RECORD = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]


APP = f"genserve--{MODEL}--v1"  # the model version's own Serve application (service/repository.py)


def replica_nodes(app: str = APP) -> dict[str, str]:
    """Running replicas of MODEL: actor name -> node id, from the Serve controller's view of them."""
    import ray

    nodes = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and f"SERVE_REPLICA::{app}#{MODEL}#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace="serve")
            try:
                nodes[actor["name"]] = ray.get(handle.__ray_call__.remote(
                    lambda self: __import__("ray").get_runtime_context().get_node_id()), timeout=5)
            except Exception:  # a replica on the node just removed
                continue
    return nodes


def node_id(node) -> str:
    """Ray's node id of a node that ray.cluster_utils.Cluster started."""
    import ray

    for info in ray.nodes():
        if info["ObjectStoreSocketName"] == node.plasma_store_socket_name:
            return info["NodeID"]
    raise AssertionError(f"no node with plasma store {node.plasma_store_socket_name}")


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[MODEL]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def test_requests_survive_a_removed_worker_node_and_replicas_come_back_elsewhere(tmp_path: Path) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from genserve.service.app import AppArgs, build

    with s3_server("multinode", tmp_path / "cache") as bucket:
        store = f"{bucket}/models"
        # Trained here, uploaded to the store; the replicas download it on their nodes.
        opened = open_store(store)
        with opened.writing() as mirror:
            train_gmm(GMMTrainConfig(dataset="sklearn:wine", name=MODEL, components=2, covariance_type="diag",
                                     n_init=1, export_onnx=False), mirror, progress=False)
        assert opened.versions(MODEL) == ["1"]

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "resources": {HEAD: 1}})
        try:
            first = [cluster.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            head = ray.get_runtime_context().get_node_id()
            on_head = {"ray_actor_options": {"num_cpus": 0, "resources": {HEAD: 0.01}}}
            overrides = {
                # The ingress and the repository on the head node, so removing a worker node leaves them (and the
                # proxy) alone.
                "Gateway": on_head, "ModelRepository": on_head,
            }
            model = {MODEL: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "resources": {SLOT: 1}},
                             "health_check_period_s": 1, "health_check_timeout_s": 5}}
            serve.run(build(AppArgs(store=store, models=[MODEL], deployments=model), overrides), name="genserve",
                      route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1/models/{MODEL}/log_prob"
            client = httpx.Client(timeout=30)
            wait_for(lambda: client.post(url, json={"records": [RECORD]}).status_code == 200, 120,
                     "the model to be served")

            before = replica_nodes()
            assert len(before) == 2 and len(set(before.values())) == 2  # one replica on each worker node
            assert head not in before.values()
            expected = client.post(url, json={"records": [RECORD]}).json()["log_prob"]

            # A client sends requests one after another while a worker node goes away.
            results: list[tuple[int, float | None]] = []
            stop = threading.Event()

            def send() -> None:
                while not stop.is_set():
                    try:
                        response = client.post(url, json={"records": [RECORD]})
                    except httpx.HTTPError as e:
                        results.append((type(e).__name__, None))
                        continue
                    body = response.json() if response.status_code == 200 else None
                    results.append((response.status_code, body["log_prob"][0] if body else None))

            sender = threading.Thread(target=send)
            sender.start()
            wait_for(lambda: len(results) >= 20, 30, "requests before the node is removed")
            third = cluster.add_node(num_cpus=1, resources={SLOT: 1})  # where the lost replica can go
            cluster.wait_for_nodes()
            cluster.remove_node(first[0])
            removed_at = len(results)
            # The lost replica is replaced on the node that has a free slot.
            third_id = node_id(third)
            wait_for(lambda: running_replicas() == 2 and third_id in replica_nodes().values(), 60,
                     "a replacement replica on the new node")
            settled = len(results)
            wait_for(lambda: len(results) >= settled + 20, 30, "requests after the replacement")
            stop.set()
            sender.join(timeout=30)

            after = replica_nodes()
            assert len(after) == 2
            assert set(after.values()) == {node_id(first[1]), third_id}
            codes = [code for code, _ in results]
            # Requests to a replica whose node died are retried on the others by Serve's router: nothing failed,
            # before, during or after the removal, and every answer is the same exact log-density.
            assert codes.count(200) == len(codes), {c: codes.count(c) for c in set(codes)}
            assert {round(v, 9) for _, v in results} == {round(expected[0], 9)}
            assert removed_at >= 20 and len(results) >= settled + 20
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
