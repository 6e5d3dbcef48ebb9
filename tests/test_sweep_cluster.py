"""The ray executor on a simulated two-node cluster (``ray.cluster_utils.Cluster``, both nodes on
this machine): a node removed mid-sweep costs only its actor's shards, and the results equal a
local sweep's."""

import os
import threading
import time
from pathlib import Path

import pytest

from lens_compare import RunConfig
from lens_compare.sweeps.local import run_sweep
from tests.fixtures.sweeps import PROMPTS, written_documents

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 300


@pytest.fixture
def two_nodes():
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), before]))
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield cluster, worker_node
    finally:
        ray.shutdown()
        cluster.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before


def test_a_lost_node_costs_only_its_shards(two_nodes, perturbed_llama, tmp_path):
    from lens_compare.sweeps.ray_executor import RayExecutor

    cluster, worker_node = two_nodes
    base, sft, _ = perturbed_llama
    (tmp_path / "pairs.yaml").write_text(f"pairs:\n  tiny:\n    base: {base}\n    sft: {sft}\n")
    config = RunConfig(pairs_file=str(tmp_path / "pairs.yaml"), prompts=PROMPTS, batch_size=1, shard_size=1,
                       bootstrap=50, logit_lens="all")
    shards = RayExecutor(workers=2)
    shards.check_shared_storage(tmp_path / "ray")
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    found, failed = {}, []

    def sweep():
        try:
            found["index"] = run_sweep(["tiny"], [12], config, tmp_path / "ray", executor=shards)
        except BaseException as error:  # reported by the assertion below
            failed.append(error)

    thread = threading.Thread(target=sweep)
    thread.start()
    runs, deadline = tmp_path / "ray" / "runs", time.monotonic() + DEADLINE_S
    while thread.is_alive() and not list(runs.glob("*/metrics/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.02)
    written = len(list(runs.glob("*/metrics/*.safetensors")))
    cluster.remove_node(worker_node)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), f"the sweep did not finish within {DEADLINE_S} s"
    assert not failed, failed
    assert 0 < written < len(PROMPTS), "the node went before the first or after the last shard"
    assert [entry.status for entry in found["index"].entries.values()] == ["done"]
    local = run_sweep(["tiny"], [12], config, tmp_path / "local")
    assert [entry.status for entry in local.entries.values()] == ["done"]
    assert written_documents(tmp_path / "ray") == written_documents(tmp_path / "local")
