"""The learner group: `learner.world_size` ranks training one policy sharded with FSDP2.

What it does
  `LearnerGroup` starts one `LearnerRank` Ray actor per rank (placed by `rl.placement`: a bundle per
  rank). The ranks form a `torch.distributed` group (NCCL on CUDA, gloo on CPU; rank 0's node IP and
  a free port as the rendezvous) and each holds a `rl.learner.Learner` whose policy (and KL reference)
  is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per decoder layer and a root
  unit over the rest (embedding, final norm, lm_head), whose forward is `token_logprobs` itself, so the
  chunked log-prob kernel reads the gathered lm_head inside the root's forward. The driver sees the
  `RemoteLearner` methods (`train_step(batch)`, `logprobs`, `weights`, `save`, `load`, `close`) plus
  `export(path, mxfp4)`; `rl.train` builds the group when `learner.world_size > 1`:

      python -m rl.train model.path=/ckpt/sft learner.device=cuda learner.world_size=4 learner.num_gpus=1 \
          rollout.num_workers=4 rollout.num_gpus=1 cluster.placement=separate
      group = LearnerGroup(path, cfg.learner, cfg.algo, seed, options=placement.learner_options)

  train_step: the driver splits the rollout batch by rows (`split_batch`: longest first, dealt round
  robin, so ranks get about the same tokens); each rank runs the algorithm-blind `Learner.train_step`
  on its rows with gradient accumulation over micro-batches. Mini-batches are drawn over the whole
  batch (the same permutation on every rank); the loss normalisers (tokens for token_mean, rows for
  the sequence means) are all-reduced, gradients are summed (not averaged) by FSDP's reduce-scatter,
  and the metrics are summed over ranks: the step is the one-process step on the whole batch, up to
  float summation order.
  Checkpoints (`save` / `load`): the HF folder of every checkpoint (rl/checkpoint.py layout) written by
  rank 0 one shard file at a time, each gathered from the ranks when it is written; the model and
  AdamW states sharded with torch.distributed.checkpoint in `learner_sharded/` (every rank writes its
  own shards); step counters and RNG in `learner_state.pt`. `load` restores all of it: resume is exact.
  `export(path, mxfp4=True)` writes a released-style MXFP4 folder (experts packed per shard).
  Weight sync (`weights()`): the sharded weights are gathered parameter by parameter into buckets of
  about `learner.sync_bucket_mb` (never splitting `rl.vllm_weights.sync_unit`), rank 0 puts each in
  Ray's object store, and the rollout workers load them one at a time (`WeightBuckets`); QAT /
  `learner.sync_mxfp4` experts are fake-quantised per bucket.

Guarantees and limits
  - Tested on CPU with 2 gloo ranks (tests/rl/test_learner_group.py): one step equals the one-process
    learner's (loss, grad norm, gradients, weights), with micro-batches, mini-batches x epochs, a KL
    reference and activation checkpointing; each rank reads exactly its rows (dense and MXFP4 folders);
    sharded save then resume gives the uninterrupted next step exactly; the buckets and the exported HF
    folder are the gathered state dict exactly. Slow tier: the Ray group's buckets synced into vLLM
    give transformers' greedy output on the group's export; `rl.train` with a group resumes exactly.
    What CPU gloo cannot show: NCCL, bf16 MixedPrecisionPolicy, and vLLM's GPU `reload_weights` one
    bucket at a time are the same code paths, never run here (no GPU).
  - Peak memory outside the shards: one bucket (sync) or one shard file (export) on rank 0, plus the
    largest single parameter on every rank (`full_tensor()` all-gathers it). A bucket is never smaller
    than one `sync_unit` (gpt-oss-120b: a layer's experts, 12.7 GB in fp32).
  - The policy (and KL reference) is built on the meta device and each rank reads only its rows of each
    tensor from the HF folder (`fill_shards`; released MXFP4 experts decoded slice by slice): no rank
    ever holds the whole model.
  - Every rank needs at least one row of each rollout batch (`split_batch` raises otherwise); a rank with
    fewer micro-batches than another runs blank passes (FSDP collectives must match).
  - The pool keeps the latest buckets' refs for a replacement worker (the object store holds one copy
    of the weights, spilled to disk under pressure), as it keeps the one-process learner's state dict.
  - A rank that dies ends the run (no re-forming of the group); the driver raises the first rank error
    at once rather than waiting on ranks stuck in a collective.

Departures
  - verl/OpenRLHF sync over NCCL (a process group spanning the learner and vLLM, or CUDA IPC handles);
    here buckets travel through Ray's object store on GPU too: simpler, slower. The NCCL/IPC path is
    left for a GPU machine.
  - Under bf16 autocast (CUDA) FSDP's MixedPrecisionPolicy all-gathers bf16 copies of the weights
    (what rl/memory_plan.py counts) and reduces gradients in fp32: norms, sinks and biases then compute
    from bf16 weights too, unlike the one-GPU learner, which autocasts matmuls only. Without autocast
    (CPU) nothing is cast: a rank computes what the one-process learner does.
  - Gradients are reduce-scattered after every micro-batch (no `set_requires_gradient_sync(False)`
    accumulation): less memory, more communication.
  - Checkpoints hold the weights twice (HF folder for evaluation and engines, sharded for resume).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from rl.batch import TrainBatch
from rl.checkpoint import LEARNER_STATE
from rl.config import AlgoConfig, LearnerConfig
from rl.device import autocast_dtype, resolve_device
from rl.learner import Learner, rng_state, set_rng_state, token_logprobs

SHARDED_STATE = "learner_sharded"  # torch.distributed.checkpoint folder: model + optimizer shards
EXPORT_SHARD_BYTES = 5 << 30  # HF export: one file (and one gather on rank 0) per ~5 GiB, as released


class Share(NamedTuple):
    """One rank's part of a rollout batch: `batch` holds rows `rows` (b,) of the `total` rows; `prompts`
    (total,) is every row's prompt id (`TrainBatch.prompt_rows`), for `algo.mini_batch_split=groups`."""

    batch: TrainBatch
    rows: torch.Tensor
    total: int
    prompts: torch.Tensor | None = None


def split_batch(batch: TrainBatch, world_size: int) -> list[Share]:
    """The rows of `batch` dealt to `world_size` ranks, longest first in turn (balanced tokens), each
    share in batch order, with every row's prompt id (`algo.mini_batch_split=groups` draws mini-batches
    of whole prompts over all ranks; a rank's learner never shares prompts, so rows are dealt for balance).

    >>> from rl.batch import TrainBatch
    >>> mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    >>> b = TrainBatch(mask, mask, mask.bool(), mask.float(), mask.float(), torch.zeros(3))
    >>> [s.rows.tolist() for s in split_batch(b, 2)]
    [[0, 1], [2]]
    """
    if batch.size < world_size:
        raise ValueError(f"a rollout batch of {batch.size} rows cannot feed {world_size} learner ranks "
                         "(learner.world_size): every rank needs a row")
    order = torch.argsort(batch.lengths, descending=True, stable=True)
    shares = [order[r::world_size].sort().values for r in range(world_size)]
    prompts = batch.prompt_rows()[1]
    return [Share(batch.select(rows), rows, batch.size, prompts) for rows in shares]


def plan_buckets(sizes: Sequence[tuple[str, int]], max_bytes: int,
                 unit: Callable[[str], str] = lambda name: name) -> list[list[str]]:
    """Names (in order, with their sizes in bytes) cut into buckets of at most `max_bytes`, never
    between two names of one `unit` (a bucket grows past `max_bytes` only to keep a unit whole).

    >>> plan_buckets([("a.q", 4), ("a.k", 4), ("b", 4), ("c", 8)], 8, unit=lambda n: n.split(".")[0])
    [['a.q', 'a.k'], ['b'], ['c']]
    """
    buckets: list[list[str]] = []
    size, last = 0, None
    for name, nbytes in sizes:
        if not buckets or (unit(name) != last and size + nbytes > max_bytes):
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
        last = unit(name)
    return buckets


class _Scorer(torch.nn.Module):
    """The FSDP root over the policy: its forward is `token_logprobs`, which reads `lm_head.weight`
    directly (the chunked kernel never calls lm_head), so the root's hooks must run around all of it."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, **kwargs):
        return token_logprobs(self.policy, input_ids, attention_mask, **kwargs)


class FSDP:
    """`rl.learner.DataParallel` of a rank in the default process group: FSDP2 sharding, collectives.
    `param_dtype` (the learner's autocast dtype, None on CPU): what the all-gathers move and the
    forward computes in (FSDP's MixedPrecisionPolicy; gradients are reduced in fp32)."""

    def __init__(self, device: torch.device, param_dtype: torch.dtype | None = None):
        self.device, self.param_dtype = device, param_dtype
        self._sources: dict[int, Path] = {}  # id(model) -> the folder `shard` fills it from

    def load(self, path: str | os.PathLike, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        """The policy at `path` built on the meta device (no memory yet; `shard` reads each rank's rows)."""
        from transformers import GptOssConfig, GptOssForCausalLM

        from rl.model import VocabMap

        if not Path(path, "config.json").is_file():  # from_pretrained would quietly give gpt-oss defaults
            raise FileNotFoundError(f"{path}: not an HF checkpoint folder (no config.json)")
        config = GptOssConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None) is not None:  # released MXFP4: decoded per slice
            del config.quantization_config
        with torch.device("meta"):
            model = GptOssForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype)
        if Path(path, "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
        self._sources[id(model)] = Path(path)
        return model, VocabMap.load(path)

    def shard(self, model: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
        """Shard `model` (a GptOssForCausalLM) in place: a unit per decoder layer, a root over the rest;
        FSDP moves each shard to `device`. Returns the root (`token_logprobs` of the model)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        reduce = torch.float32 if self.param_dtype else None
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=reduce)
        units = [fully_shard(layer, mesh=mesh, mp_policy=mp) for layer in model.model.layers]
        # FSDP keeps a root gathered after forward, for the backward to come; a frozen model (the KL
        # reference) has no backward, so its embedding and lm_head would stay gathered for good.
        frozen = not any(p.requires_grad for p in model.parameters())
        root = fully_shard(_Scorer(model), mesh=mesh, mp_policy=mp, reshard_after_forward=True if frozen else None)
        for unit in [*units, root]:
            # The learner normalises every rank's loss by the whole batch: gradients are summed, not averaged.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        # A parameter without a gradient on one rank (an expert nobody routed to) still joins the reduce-scatter.
        root.set_reduce_scatter_unused_params(True)
        if id(model) in self._sources:
            fill_shards(root, self._sources.pop(id(model)), device)
        return root

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(values.device)

    def max(self, n: int) -> int:
        out = torch.tensor([n], device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return int(out)

    def cat(self, values: torch.Tensor) -> torch.Tensor:
        """(n_r,) of every rank r, concatenated in rank order (lengths may differ)."""
        world = dist.get_world_size()
        n = torch.tensor([values.numel()], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        width = int(max(sizes))
        padded = torch.zeros(width, dtype=values.dtype, device=self.device)
        padded[: values.numel()] = values.reshape(-1).to(self.device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(values.device)


def fill_shards(root: _Scorer, path: Path, device: torch.device) -> None:
    """Materialise a meta-built gpt-oss, sharded under FSDP root `root`, from its HF folder: every rank
    reads only the rows of its shards (FSDP2 shards dim 0 in `torch.chunk` pieces) as safetensors
    slices, released MXFP4 experts decoded slice by slice; the rotary buffers are rebuilt."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from kernels.mxfp4_checkpoint import BLOCKS_SUFFIX, SCALES_SUFFIX, tensor_files, unpack_state_dict

    root.to_empty(device=device)  # on the FSDP root: FSDP re-points its shards at the new storage
    model = root.policy
    where = tensor_files(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    with ExitStack() as stack, torch.no_grad():
        files = {f: stack.enter_context(safe_open(str(path / f), "pt")) for f in set(where.values())}
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            chunk = -(-param.shape[0] // world)
            start, end = min(rank * chunk, param.shape[0]), min((rank + 1) * chunk, param.shape[0])
            if local.shape[0] != end - start:
                raise RuntimeError(f"{name}: local shard of {local.shape[0]} rows, expected rows {start}:{end}")
            if name in where:
                value = files[where[name]].get_slice(name)[start:end]
            elif name + BLOCKS_SUFFIX in where:
                keys = (name + BLOCKS_SUFFIX, name + SCALES_SUFFIX)
                packed = {k: files[where[k]].get_slice(k)[start:end] for k in keys}
                value = unpack_state_dict(packed, local.dtype)[name]
            else:
                raise KeyError(f"{path} holds no tensor {name} (nor its MXFP4 blocks)")
            local.copy_(value)
    model.model.rotary_emb = GptOssRotaryEmbedding(config=model.config).to(device)


def free_address(host: str) -> str:
    """`host:port` with a port free on this node now (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


def join_group(rank: int, world_size: int, master: str, device: torch.device) -> None:
    """Join the default process group (NCCL on CUDA, gloo on CPU) at `master` (host:port of rank 0)."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"asked to be {rank} of {world_size}")
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{master}",
                            rank=rank, world_size=world_size)


class LearnerRank:
    """One rank: a `Learner` over FSDP2 in this process. A Ray actor under `LearnerGroup`; tests run
    ranks with torch.multiprocessing. `start` joins the group and builds the learner (collective)."""

    def rendezvous(self) -> str:
        """Where rank 0 (this actor) listens: its node IP and a free port."""
        import ray

        return free_address(ray.util.get_node_ip_address())

    def start(self, rank: int, world_size: int, master: str, model_path: str, cfg: LearnerConfig,
              algo: AlgoConfig, seed: int = 0) -> None:
        device = resolve_device(cfg.device)
        join_group(rank, world_size, master, device)
        self.rank, self.cfg = rank, cfg
        parallel = FSDP(device, autocast_dtype(device, cfg.autocast, cfg.dtype))
        self.learner = Learner(model_path, cfg, algo, seed, parallel=parallel)

    def get_step(self) -> int:
        return self.learner.step

    def train_step(self, share: Share) -> dict[str, float]:
        state = [rng_state()]  # mini-batches are drawn from the RNG: every rank must draw rank 0's
        dist.broadcast_object_list(state, src=0)
        set_rng_state(state[0])
        return self.learner.train_step(share.batch, rows=share.rows, total=share.total, prompts=share.prompts)

    def logprobs(self, share: Share) -> torch.Tensor:
        return self.learner.logprobs(share.batch)

    def watch_rollouts(self, probe) -> None:
        self.learner.watch_rollouts(probe)

    # ---- gathering the sharded weights ---------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return self.learner.model.state_dict()  # DTensor shards, no copy

    def _plan(self, max_bytes: int, unit: Callable[[str], str] = lambda name: name) -> list[list[str]]:
        sizes = [(name, t.numel() * t.element_size()) for name, t in self._state().items()]  # global sizes
        return plan_buckets(sizes, max_bytes, unit)

    def _gather(self, plan: list[list[str]], transform: Callable[[dict], dict] = lambda d: d
                ) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of full CPU tensors per bucket of `plan` on rank 0 ({} on the others), gathered one
        parameter at a time when the bucket is asked for (every rank must iterate to the end)."""
        state = self._state()
        for names in plan:
            bucket = {}
            for name in names:
                t = state[name]
                full = t.full_tensor() if hasattr(t, "full_tensor") else t  # all-gather: collective
                if self.rank == 0:
                    bucket[name] = full.detach().to("cpu", copy=True)
                del full
            yield transform(bucket) if self.rank == 0 else {}

    def buckets(self) -> Iterator[dict[str, torch.Tensor]]:
        """The weights for the rollout engines, in buckets of about `learner.sync_bucket_mb` (rank 0)."""
        from rl.vllm_weights import sync_unit

        return self._gather(self._plan(int(self.cfg.sync_bucket_mb * 2**20), sync_unit), self._for_engine)

    def _for_engine(self, bucket: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """QAT / `learner.sync_mxfp4`: experts as the MXFP4 values the engine must serve."""
        if not self.learner.sync_mxfp4:
            return bucket
        from kernels.mxfp4_checkpoint import EXPERT_WEIGHTS
        from kernels.qat import quantized_expert_weight

        return {k: quantized_expert_weight(v) if k.endswith(EXPERT_WEIGHTS) else v for k, v in bucket.items()}

    def state_for_sync(self) -> list:
        """`buckets()` put in Ray's object store one at a time: rank 0 returns the refs, others []."""
        import ray

        return [ray.put(b) for b in self.buckets() if self.rank == 0]

    # ---- checkpoints ---------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, mxfp4: bool = False, shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
        """The HF folder of the policy in `path` (created): weight files written by rank 0 one at a time,
        config, vocabulary. `mxfp4`: released layout (experts packed, the rest bf16)."""
        from kernels.mxfp4_checkpoint import released_tensors, write_config, write_weight_files
        from rl.model import save_vocabulary

        plan = self._plan(shard_bytes)
        pieces = self._gather(plan, released_tensors if mxfp4 else lambda d: d)
        if self.rank == 0:
            path = Path(path)
            write_weight_files(path, pieces, len(plan))
            model = self.learner.model
            dtype = torch.bfloat16 if mxfp4 else getattr(torch, self.cfg.dtype)
            write_config(path, model.config, "GptOssForCausalLM", dtype, mxfp4=mxfp4)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(path)
            save_vocabulary(self.learner.vmap, path)
        else:
            for _ in pieces:  # the gathers are collective
                pass
        dist.barrier()  # every rank returns when the folder is complete (a rank may read it next)

    def save(self, path: str | os.PathLike) -> None:
        """HF folder + sharded model/optimizer + step/RNG in `path` (the caller makes it atomic)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(path)
        self.export(path)
        model_sd, optim_sd = get_state_dict(self.learner.model, self.learner.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / SHARDED_STATE)
        if self.rank == 0:  # every rank draws with rank 0's RNG (`train_step`)
            lrn = self.learner
            torch.save({"step": lrn.step, "opt_steps": lrn.opt_steps, "rng": rng_state(),
                        "world_size": dist.get_world_size(), "sharded": SHARDED_STATE}, path / LEARNER_STATE)
        dist.barrier()

    def load(self, path: str | os.PathLike) -> None:
        """Restore what `save` wrote (a group of any size reads it: DCP reshards). The KL reference
        stays the initial policy."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        extra = torch.load(path / LEARNER_STATE, weights_only=False, map_location="cpu")
        if "sharded" not in extra:
            raise RuntimeError(f"{path} was written by a one-process learner: resume it with learner.world_size=1")
        lrn = self.learner
        model_sd, optim_sd = get_state_dict(lrn.model, lrn.opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path / extra["sharded"])
        set_state_dict(lrn.model, lrn.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        lrn.step, lrn.opt_steps = extra["step"], extra["opt_steps"]
        set_rng_state(extra["rng"])


class LearnerGroup:
    """`learner.world_size` `LearnerRank` actors behind `RemoteLearner`'s methods (module docstring)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgoConfig, seed: int = 0, *,
                 options: Callable[[int], dict[str, Any]] | None = None):
        """`options(rank)`: Ray actor options (`rl.placement.RunPlacement.learner_options`); default
        `learner.num_cpus` / `learner.num_gpus`, placed by Ray."""
        import ray

        self._ray = ray
        options = options or (lambda rank: {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus})
        actor = ray.remote(LearnerRank)
        self.ranks = [actor.options(**options(r)).remote() for r in range(cfg.world_size)]
        try:
            master = ray.get(self.ranks[0].rendezvous.remote())
            self._all(a.start.remote(r, cfg.world_size, master, model_path, cfg, algo, seed)
                      for r, a in enumerate(self.ranks))
        except BaseException:
            self.close()  # the other ranks would wait for the failed one in the rendezvous
            raise

    def _all(self, refs) -> list:
        """Every rank's result; the first rank error is raised at once (the others may be stuck in a
        collective waiting for the failed rank)."""
        refs = list(refs)
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            self._ray.get(done[0])
        return self._ray.get(refs)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        shares = split_batch(batch, len(self.ranks))
        return self._all(a.train_step.remote(s) for a, s in zip(self.ranks, shares))[0]  # summed: same on all (overlap/yielded: rank 0's)

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """(B, L) learner log-probs of the completion tokens, as `Learner.logprobs`."""
        shares = split_batch(batch, len(self.ranks))
        out = torch.zeros(batch.input_ids.shape)
        for share, lp in zip(shares, self._all(a.logprobs.remote(s) for a, s in zip(self.ranks, shares))):
            out[share.rows, : lp.shape[1]] = lp
        return out

    def rollout_tracker(self):
        """A `rl.overlap.SharedTracker` every rank polls (`Learner.watch_rollouts`)."""
        from rl.overlap import shared_tracker

        return shared_tracker(self.watch_rollouts)

    def watch_rollouts(self, probe) -> None:
        self._all(a.watch_rollouts.remote(probe) for a in self.ranks)

    def weights(self):
        """A `rl.vllm_weights.WeightBuckets` for `WorkerPool.update_weights`."""
        from rl.vllm_weights import WeightBuckets

        return WeightBuckets(tuple(self._all(a.state_for_sync.remote() for a in self.ranks)[0]))

    def save(self, path) -> None:
        self._all(a.save.remote(str(path)) for a in self.ranks)

    def load(self, path) -> None:
        self._all(a.load.remote(str(path)) for a in self.ranks)

    def export(self, path, mxfp4: bool = False) -> None:
        """The policy as an HF folder at `path` (`mxfp4`: released MXFP4 layout), for vLLM and transformers."""
        self._all(a.export.remote(str(path), mxfp4) for a in self.ranks)

    def get_step(self) -> int:
        return self._all([self.ranks[0].get_step.remote()])[0]

    def close(self) -> None:
        """Kill the rank actors and wait until they are gone (their process group's port and devices free)."""
        from rl.cluster import kill_actors

        ranks, self.ranks = self.ranks, []
        kill_actors(ranks)
