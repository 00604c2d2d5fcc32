"""Ray placement of a run's actors: which bundle each learner rank and each rollout worker lands in.

    placement = RunPlacement.create(cfg)           # reserves the bundles (or nothing, placement=none)
    RemoteLearner(path, cfg.learner, cfg.algo, seed, options=placement.learner_options(0))
    WorkerPool(path, cfg.rollout, seed, options=placement.worker_options)   # options(i) for slot i
    placement.remove()

Layouts (`cluster.placement`):
- `none` (default): no placement group. Ray places every actor by its own `num_cpus`/`num_gpus`
  (`learner.*`, `rollout.*`), which are 0 GPUs by default: the CPU box runs exactly as before.
- `separate`: one placement group, bundles [learner rank 0..R-1, rollout worker 0..W-1]. A rank's
  bundle holds `learner.num_cpus` CPUs and `learner.num_gpus` GPUs, a worker's `rollout.num_cpus`
  and `rollout.num_gpus` (= tensor_parallel_size for a TP engine: a bundle lives on one node, so a
  TP engine's GPUs are on one node). Learner and engines never share a GPU.
- `colocate`: R bundles of one GPU each; learner rank i and rollout worker i both go into bundle i
  with their fractional `num_gpus` (e.g. 0.5 + 0.5), so they share its GPU. vLLM takes
  `rollout.gpu_memory_utilization` of that GPU's memory and the learner must fit in the rest
  (`rl/memory_plan.py` checks it). Needs `rollout.num_workers == learner.world_size` and
  tensor_parallel_size 1 (validated in rl/config.py).

`cluster.placement_strategy` is Ray's (PACK: as few nodes as possible; SPREAD; STRICT_*), and the
group must be ready within `cluster.placement_timeout_s` or the run stops naming what it asked for
and what the cluster has free. Child tasks are captured by the group, so workers an actor starts (a
vLLM engine's Ray executor) stay inside its bundle. With `learner.world_size > 1` each rank of the
FSDP2 group (rl/learner_group.py) takes its bundle (`learner_options(rank)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rl.config import Config


@dataclass(frozen=True)
class PlacementSpec:
    """Bundles (Ray resource dicts) and which bundle each learner rank / rollout worker uses."""

    bundles: list[dict[str, float]]
    learner_bundles: list[int]  # rank r -> bundle index
    worker_bundles: list[int]  # worker slot i -> bundle index
    strategy: str


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A Ray bundle; zero entries left out (Ray refuses zero-valued resources in a bundle)."""
    return {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def placement_spec(cfg: Config, layout: str | None = None) -> PlacementSpec:
    """The bundles `cfg` asks for under `layout` (default `cfg.cluster.placement`; "none" is laid out
    as "separate", which is what its actors take from the cluster). Pure: starts nothing.

    >>> c = Config()
    >>> c.learner.num_gpus, c.rollout.num_gpus, c.rollout.num_workers = 0.5, 0.5, 1
    >>> placement_spec(c, "colocate").bundles
    [{'CPU': 2.0, 'GPU': 1.0}]
    >>> placement_spec(c, "separate").bundles
    [{'CPU': 1.0, 'GPU': 0.5}, {'CPU': 1.0, 'GPU': 0.5}]
    """
    layout = layout or cfg.cluster.placement
    ranks, workers = cfg.learner.world_size, cfg.rollout.num_workers
    lrn, rol = cfg.learner, cfg.rollout
    if layout == "colocate":
        gpus = math.ceil(lrn.num_gpus + rol.num_gpus)  # one whole GPU per pair (0 if neither uses one)
        bundles = [_bundle(lrn.num_cpus + rol.num_cpus, gpus) for _ in range(ranks)]
        return PlacementSpec(bundles, list(range(ranks)), list(range(workers)), cfg.cluster.placement_strategy)
    bundles = [_bundle(lrn.num_cpus, lrn.num_gpus) for _ in range(ranks)]
    bundles += [_bundle(rol.num_cpus, rol.num_gpus) for _ in range(workers)]
    return PlacementSpec(bundles, list(range(ranks)), list(range(ranks, ranks + workers)),
                         cfg.cluster.placement_strategy)


def gpus_needed(cfg: Config) -> float:
    """GPUs the run takes from the cluster under its layout (what `cluster.gpus_per_node` must cover)."""
    return sum(b.get("GPU", 0.0) for b in placement_spec(cfg).bundles)


class RunPlacement:
    """The run's placement group (None for `cluster.placement=none`) and the Ray `.options(...)` of
    each actor. Build with `create`; `remove` releases the bundles."""

    def __init__(self, cfg: Config, spec: PlacementSpec, group: Any = None):
        self.cfg, self.spec, self.group = cfg, spec, group

    @classmethod
    def create(cls, cfg: Config) -> "RunPlacement":
        """Reserve the bundles on the running Ray (waits up to `cluster.placement_timeout_s`)."""
        spec = placement_spec(cfg)
        if cfg.cluster.placement == "none":
            return cls(cfg, spec)
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group(spec.bundles, strategy=spec.strategy)  # released with the job at the latest
        try:
            ray.get(group.ready(), timeout=cfg.cluster.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(
                f"cluster.placement={cfg.cluster.placement}: Ray could not reserve {spec.bundles} "
                f"({spec.strategy}) within {cfg.cluster.placement_timeout_s:g} s; the cluster has "
                f"{ray.cluster_resources()} ({ray.available_resources()} free). Lower learner/rollout num_gpus "
                "or rollout.num_workers, or add nodes") from None
        return cls(cfg, spec, group)

    def _options(self, bundle: int, num_cpus: float, num_gpus: float) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True)
        return opts

    def learner_options(self, rank: int = 0) -> dict[str, Any]:
        """`.options(...)` for learner rank `rank`."""
        lrn = self.cfg.learner
        return self._options(self.spec.learner_bundles[rank], lrn.num_cpus, lrn.num_gpus)

    def worker_options(self, slot: int) -> dict[str, Any]:
        """`.options(...)` for rollout worker slot `slot` (a replacement worker reuses its slot's bundle)."""
        rol = self.cfg.rollout
        return self._options(self.spec.worker_bundles[slot], rol.num_cpus, rol.num_gpus)

    def remove(self) -> None:
        """Release the bundles (idempotent)."""
        group, self.group = self.group, None
        if group is not None:
            import ray
            from ray.util.placement_group import remove_placement_group

            if ray.is_initialized():
                remove_placement_group(group)
