"""The `ray up` cluster YAMLs in deploy/ray/ pass Ray's own cluster-config schema, and the deployment configs they
go with pin pools to the custom resources those node types advertise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.config import ClusterConfig

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", ["cluster-local.yaml", "cluster-aws.yaml"])
def test_cluster_yaml_passes_rays_schema(name: str) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load((ROOT / "deploy" / "ray" / name).read_text())
    util.validate_config(util.fillout_defaults(config))  # raises on a schema violation


def test_gpu_config_asks_for_what_the_aws_node_types_offer() -> None:
    cfg = ClusterConfig.load(str(ROOT / "deploy" / "configs" / "ray.yaml"))
    types = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster-aws.yaml").read_text())["available_node_types"]
    offered = {k for t in types.values() for k in t.get("resources", {})}
    for pool in ("prefill", "decode"):
        assert set(cfg.pool(pool).resources.custom) <= offered and cfg.pool(pool).resources.num_gpus == 1
    assert set(cfg.ray.router_resources.custom) <= set(types["head"]["resources"])
