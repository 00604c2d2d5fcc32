"""Ray cluster: an embedded local Ray by default, or join a running cluster (`cluster.address`)."""
from __future__ import annotations

import os


def init_ray(cluster_cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    # vLLM inside a Ray actor must keep the engine in-process (DESIGN §7).
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    if cluster_cfg.address:
        ray.init(address=cluster_cfg.address, namespace=cluster_cfg.namespace, runtime_env=env,
                 log_to_driver=True)
    else:
        ray.init(num_cpus=cluster_cfg.num_cpus or max(os.cpu_count() or 2, 4),
                 namespace=cluster_cfg.namespace, runtime_env=env, include_dashboard=False,
                 log_to_driver=True)
