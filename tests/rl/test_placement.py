"""Ray placement of the learner and rollout workers: bundle specs for each layout (pure, no Ray), actor
options, and (slow) a real placement group on the CPU Ray with a worker replaced inside its bundle."""
import pytest

from rl.config import compose
from rl.placement import RunPlacement, gpus_needed, placement_spec


def _cfg(*overrides):
    return compose(list(overrides))


def test_default_is_no_placement_group_and_no_gpus():
    c = _cfg()
    p = RunPlacement.create(c)  # placement=none: starts nothing, needs no Ray
    assert p.group is None and gpus_needed(c) == 0
    assert p.learner_options(0) == {"num_cpus": c.learner.num_cpus, "num_gpus": 0.0}
    assert p.worker_options(0) == {"num_cpus": c.rollout.num_cpus, "num_gpus": 0.0}
    p.remove()


def test_separate_layout_gives_every_rank_and_worker_its_own_bundle():
    c = _cfg("cluster.placement=separate", "learner.num_gpus=1", "learner.num_cpus=8", "rollout.num_workers=2",
             "rollout.num_gpus=2", "rollout.tensor_parallel_size=2", "rollout.num_cpus=4")
    spec = placement_spec(c)
    assert spec.bundles == [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert spec.learner_bundles == [0] and spec.worker_bundles == [1, 2] and spec.strategy == "PACK"
    assert gpus_needed(c) == 5


def test_colocate_layout_puts_rank_i_and_worker_i_on_one_gpu():
    c = _cfg("cluster.placement=colocate", "learner.num_gpus=0.5", "rollout.num_gpus=0.5")
    spec = placement_spec(c)
    assert spec.bundles == [{"CPU": 2.0, "GPU": 1.0}]
    assert spec.learner_bundles == spec.worker_bundles == [0]
    assert gpus_needed(c) == 1


def test_bundles_leave_out_zero_resources():
    """Ray refuses a zero-valued resource in a bundle: CPU-only runs ask for CPUs alone."""
    assert placement_spec(_cfg("cluster.placement=separate")).bundles == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_gpu_count_is_checked_against_the_stated_cluster():
    ok = ["cluster.placement=separate", "cluster.gpus_per_node=8", "learner.num_gpus=1", "rollout.num_workers=7",
          "rollout.num_gpus=1"]
    assert gpus_needed(_cfg(*ok)) == 8
    with pytest.raises(ValueError, match="'cluster.gpus_per_node'.*needs 9 GPUs"):
        _cfg(*ok[:-2], "rollout.num_workers=8", "rollout.num_gpus=1")


@pytest.mark.slow
def test_placement_group_on_cpu_ray_holds_the_actors(tmp_path):
    """A real `separate` placement group (CPU bundles): the learner-side and worker-side actors land in
    their bundles; the group is released on `remove`."""
    import ray
    from ray.util import placement_group_table

    c = _cfg("cluster.placement=separate", "rollout.num_workers=2", "cluster.num_cpus=4",
             "cluster.placement_timeout_s=60")
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        p = RunPlacement.create(c)

        @ray.remote
        class Probe:
            def where(self):
                return ray.get_runtime_context().get_placement_group_id()

        actors = [Probe.options(**p.learner_options(0)).remote()] + \
                 [Probe.options(**p.worker_options(i)).remote() for i in range(2)]
        assert set(ray.get([a.where.remote() for a in actors])) == {p.group.id.hex()}
        gid = p.group.id.hex()
        p.remove()
        assert placement_group_table()[gid]["state"] == "REMOVED"
    finally:
        ray.shutdown()


def test_docstring_examples():
    import doctest

    import rl.placement

    assert doctest.testmod(rl.placement).failed == 0
