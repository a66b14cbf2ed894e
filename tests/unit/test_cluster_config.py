"""cluster.yaml passes Ray's own cluster-config validation and declares GPU workers."""

import copy

import yaml


def test_cluster_yaml_is_valid_for_the_ray_launcher(repo_root):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((repo_root / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu_types = {name: t for name, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types.values())
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    import ray

    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "AWS_SECRET_ACCESS_KEY" not in (repo_root / "cluster.yaml").read_text()
