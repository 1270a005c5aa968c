"""The plan: every setting of (dp_shard, reshard policy, AC mode) a job could run with, its memory
per rank, its collectives and its predicted speed, and the cheapest one that fits.

What is measured and what is derived:

- The *main mesh* (the ``dp_shard`` the config resolves to on this cluster) runs the fake step
  (`probe.profile_step`) for every AC mode and both reshard policies: six measured settings
  (three when keeping every block gathered could not fit: the gathered model alone exceeds the
  memory). A replicated base (``dp_shard: 1``) runs its own three when its whole base fits.
- Every other valid ``dp_shard`` is built (on the meta device, by the real recipe) for its exact
  per-rank parameter bytes, and takes the main mesh's measured step for the rest: what a rank
  creates during a step (gathered blocks, activations, logits, temporaries) does not depend on how
  many ranks share the base, while its parameters, gradients and optimizer state are its own
  shards. Its collectives are the main mesh's calls on its own groups: the same calls, moving the
  same blocks (scaled by the padded size of its shards), over a shard group of its size.
  Full fine-tuning measures on a mesh with at least two copies when there is one, so that the
  all-reduce between copies (HSDP) is in the record.

A deep model's fake steps run at two small depths (`SAMPLED_DEPTHS` blocks) and are extrapolated
to its own (`probe.at_depth`): its blocks are alike, so every byte, FLOP and collective a step
counts is an affine function of the depth, and the two shallow steps cost a few blocks each where
the real depth costs up to 126 (tests/plan/test_planner.py compares the two on whole models).
Models whose layers differ (sliding windows shorter than the sequence in some layers) and
``full_depth`` run at their own depth.

The recommendation is the setting with the shortest predicted step among those whose peak fits in
the GPU's memory less the headroom; steps within 1% of each other tie, and then the fewest bytes
sent, the least recompute and the smallest peak decide.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor

from pmss_dist.adapters.layers import FULL, adapter_layers, count_parameters
from pmss_dist.adapters.quantize import check_quantizable, tensor_bytes
from pmss_dist.build import parameter_bytes
from pmss_dist.errors import ConfigError
from pmss_dist.eval.preference import preference_loss, steps_run_reference_forward
from pmss_dist.config import AC_MODES, ParallelConfig, TrainConfig, adapter_spec, check_world_size
from pmss_dist.models.spec import ModelSpec
from pmss_dist.parallel.mesh import REPLICATE, SHARD, ParallelDims
from pmss_dist.parallel.parallelize import resolve_reshard_after_forward
from pmss_dist.plan.comms import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, Collective, CommVolume, step_volume
from pmss_dist.plan.fake import fake_mesh, fake_model, fake_world, mesh_groups, meta_model
from pmss_dist.plan.probe import StepProfile, at_depth, local_bytes, profile_step
from pmss_dist.plan.timing import Cluster, StepTime, step_time
from pmss_dist.train.metrics import flops_per_token

# Cheapest first: the order ties are broken in, and the order of the report's rows.
AC_ORDER = ("none", "selective", "full")
assert set(AC_ORDER) == set(AC_MODES)
# The fake process group has no limit; this is the scale the planner is tested and timed at.
MAX_WORLD_SIZE = 1024
# The depths a deep model's fake steps run at: each at least 2 x probe.Windows.EDGE_BLOCKS, so
# that every window of the first and last blocks is in both (`at_depth` declines otherwise).
# Only deeper models than their sum are sampled: for them the two steps together cost fewer
# blocks than one at the model's depth.
SAMPLED_DEPTHS = (4, 6)


@dataclass(frozen=True)
class Setting:
    dp_shard: int
    reshard_after_forward: bool | None  # None: nothing sharded (a replicated base)
    activation_checkpointing: str

    def overrides(self) -> str:
        keys = [f"parallel.dp_shard={self.dp_shard}"]
        if self.reshard_after_forward is not None:
            keys.append(f"parallel.reshard_after_forward={str(self.reshard_after_forward).lower()}")
        keys.append(f"parallel.activation_checkpointing={self.activation_checkpointing}")
        return " ".join(keys)


@dataclass
class Row:
    """One setting: bytes per rank, the step's collectives and time. ``source`` says how its
    numbers were obtained: "measured" (a fake step of its own), "step of dp_shard=N" (its own
    parameter bytes, the step of the main mesh), "parameters only" or "gathered model only"
    (those alone exceed the memory, so no step was run: ``peak`` is a lower bound)."""

    setting: Setting
    source: str
    frozen: int  # frozen parameter bytes (the base's shards, or the whole base)
    trained: int  # trained tensors: replicated cores / LoRA factors, or full fine-tuning's fp32 shards
    grads: int  # their gradients
    optimizer: int  # AdamW state
    gathered: int | None  # unsharded blocks and all-gather buffers at the peak
    activations: int | None  # what the forward leaves for backward (logits not included)
    logits: int | None  # the most the loss head holds at once
    peak: int  # live tensor bytes at the step's peak (parameters only: a lower bound)
    fits: bool
    volume: CommVolume | None = None
    time: StepTime | None = None
    breakdown: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    cluster: Cluster
    model_name: str
    model_source: str
    adapter: str
    dtype: str
    total_params: int
    trainable_params: int
    parameter_bytes: int  # the whole model as built (unsharded)
    seq_len: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    peft_flops_per_token: float
    config_setting: Setting  # what the config resolves to on this cluster (its "auto"s)
    main_dp_shard: int
    rows: list[Row]
    recommended: Row | None
    seconds: float  # the planner's own time
    sampled_depths: tuple[int, int] | None  # the depths fake steps ran at, when not the model's own
    unsplittable: dict[int, str]  # dp_shard -> why the quantized base cannot be sharded that way (not planned)

    def row(self, setting: Setting) -> Row | None:
        return next((r for r in self.rows if r.setting == setting), None)


def valid_dp_shards(world_size: int, gpus_per_node: int) -> list[int]:
    """The ``dp_shard`` values `ParallelDims.resolve` accepts: divisors of the world
    size that divide a node or span whole nodes."""
    return [s for s in range(1, world_size + 1)
            if world_size % s == 0 and (gpus_per_node % s == 0 or s % gpus_per_node == 0)]


class _Context:
    """What every probe of one plan shares: the config, the model, the fake world's meshes."""

    def __init__(self, cfg: TrainConfig, model_spec: ModelSpec, cluster: Cluster, grad_accum: int):
        a = cfg.adapter
        self.cfg, self.model_spec, self.cluster, self.grad_accum = cfg, model_spec, cluster, grad_accum
        self.depths: tuple[int, int] | None = None  # set by `plan` for a model whose steps are sampled
        self.spec = adapter_spec(cfg)
        self.full = a.kind == FULL
        self.dtype = getattr(torch, cfg.model.dtype)
        self._meshes: dict = {}

    def mesh(self, dp_shard: int):
        if dp_shard not in self._meshes:  # each mesh makes process groups: make it once
            self._meshes[dp_shard] = fake_mesh(self.cluster.world_size, dp_shard, self.full)
        return self._meshes[dp_shard]

    def parallel(self, setting: Setting) -> ParallelConfig:
        return ParallelConfig(compile=False, activation_checkpointing=setting.activation_checkpointing,
                              reshard_after_forward=bool(setting.reshard_after_forward))

    def build_args(self, setting: Setting) -> dict:
        return dict(adapter=self.spec, mesh=self.mesh(setting.dp_shard), dtype=self.dtype,
                    parallel=self.parallel(setting), max_seq_len=self.cfg.data.seq_len)

    def probe(self, setting: Setting) -> StepProfile:
        if self.depths is not None:
            shallow, deep = (self._probe(setting, _with_depth(self.model_spec, d)) for d in self.depths)
            extrapolated = at_depth(shallow, deep, self.depths, self.model_spec.num_layers)
            if extrapolated is not None:
                return extrapolated
            self.depths = None  # blocks not alike after all: this and every later step at full depth
        return self._probe(setting, self.model_spec)

    def _probe(self, setting: Setting, model_spec: ModelSpec) -> StepProfile:
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        model = fake_model(model_spec, fake_mode=fake_mode, **self.build_args(setting))
        o, d = self.cfg.optim, self.cfg.data
        profile = profile_step(model, fake_mode=fake_mode,
                               optim_args=dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay),
                               micro_batch=d.micro_batch_size, seq_len=d.seq_len,
                               vocab_size=model_spec.vocab_size, packed=d.packed, grad_accum=self.grad_accum,
                               grad_clip=o.grad_clip, groups=mesh_groups(self.mesh(setting.dp_shard)),
                               preference=preference_loss(self.cfg.objective),
                               reference_forward=steps_run_reference_forward(self.cfg.objective))
        del model
        gc.collect()
        return profile

    def shards(self, dp_shard: int) -> dict[str, int]:
        """Per-rank parameter bytes on ``dp_shard`` from a meta build: frozen, trained, and the
        padded size of everything FSDP2 gathers (its all-gathers' payload, in storage dtype)."""
        setting = Setting(dp_shard, True, "none")
        model = meta_model(self.model_spec, **self.build_args(setting))
        params = list(model.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        # FSDP2 all-gathers floating weights in the compute dtype (full fine-tuning's fp32 masters
        # too), a quantized base as stored
        return {"frozen": local_bytes(p for p in params if not p.requires_grad),
                "trained": local_bytes(p for p in params if p.requires_grad),
                "gathered": sum(_gathered_bytes(p, self.dtype) for p in sharded) * dp_shard}

    def groups(self, dp_shard: int) -> dict[str, tuple[int, ...]]:
        """Rank 0's groups on ``dp_shard``'s mesh, by role."""
        mesh = self.mesh(dp_shard)
        roles = {"world": tuple(range(self.cluster.world_size))}
        if mesh is not None:
            for name in mesh.mesh_dim_names:
                roles[name] = tuple(dist.get_process_group_ranks(mesh.get_group(name)))
        return roles


def plan(cfg: TrainConfig, model_spec: ModelSpec, cluster: Cluster, *, model_name: str, model_source: str,
         progress=None, full_depth: bool = False) -> Plan:
    """Plan ``cfg`` (a loaded run config) for the model ``model_spec`` on ``cluster``; with
    ``full_depth``, every fake step at the model's own depth (never sampled)."""
    started = time.perf_counter()
    _check_cluster(cluster)
    world, g = cluster.world_size, cluster.gpus_per_node
    grad_accum = check_world_size(cfg, world)
    say = progress or (lambda message: None)
    ctx = _Context(cfg, model_spec, cluster, grad_accum)
    total_bytes = parameter_bytes(model_spec, adapter=ctx.spec, dtype=ctx.dtype)
    shard = ParallelDims.resolve(cfg.parallel, world, g, total_bytes, cluster.memory_bytes).shard
    reshard = resolve_reshard_after_forward(cfg.parallel.reshard_after_forward, total_bytes, cluster.memory_bytes)
    config_setting = Setting(shard, None if shard == 1 and not ctx.full else reshard,
                             cfg.parallel.activation_checkpointing)
    candidates = valid_dp_shards(world, g)

    with fake_world(world):
        whole = meta_model(model_spec, **ctx.build_args(Setting(1, True, "none")))
        unsplittable = {s: why for s in candidates if (why := _split_refusal(whole, ctx.spec.quantize, s))}
        if shard in unsplittable:
            raise ConfigError(unsplittable[shard])  # the config's own mesh: its run would be refused the same way
        candidates = [s for s in candidates if s not in unsplittable]
        counts = count_parameters(whole)
        peft_flops = flops_per_token(whole, model_spec, cfg.data.seq_len,
                                     reference_forward=steps_run_reference_forward(cfg.objective))
        if not full_depth:
            ctx.depths = _sampled_depths(model_spec.num_layers, model_spec.windows, cfg.data.seq_len)
        del whole
        shards = {s: ctx.shards(s) for s in candidates}
        groups = {s: ctx.groups(s) for s in candidates}
        main = _main_dp_shard(shard, candidates, g, world, ctx.full,
                              {s: _parameters_fit(shards[s], cluster) for s in candidates})
        measured: dict[Setting, StepProfile] = {}
        for s in sorted({1, main}):
            if not _parameters_fit(shards[s], cluster):
                continue
            for policy in _reshard_policies(s, ctx.full):
                if policy is False and not _parameters_fit(shards[s], cluster, gathered=True):
                    continue  # keeping every block gathered: the gathered model alone does not fit
                for ac in AC_ORDER:
                    setting = Setting(s, policy, ac)
                    say(f"fake step {len(measured) + 1}: {setting.overrides()}")
                    measured[setting] = ctx.probe(setting)

    rows_per_sample = 2 if preference_loss(cfg.objective) else 1  # a dpo pair is two rows
    tokens_per_rank = cfg.data.micro_batch_size * rows_per_sample * cfg.data.seq_len * grad_accum
    rows: list[Row] = []
    for s in candidates:
        for policy in _reshard_policies(s, ctx.full):
            for ac in AC_ORDER:
                setting, on_main = Setting(s, policy, ac), Setting(main, policy, ac)
                if setting in measured:
                    row, source = _measured_row(setting, measured[setting], ctx), setting
                elif s != 1 and on_main in measured and _parameters_fit(shards[s], cluster, gathered=policy is False):
                    row, source = _derived_row(setting, measured[on_main], main, shards, groups, ctx), on_main
                else:
                    row, source = _parameters_row(setting, shards[s], gathered=policy is False), None
                if source is not None:
                    row.time = step_time(cluster, tokens_per_rank=tokens_per_rank, peft_flops_per_token=peft_flops,
                                         recompute_flops=_recompute_flops(source, measured) * grad_accum,
                                         volume=row.volume)
                rows.append(row)
    recommended = _cheapest([r for r in rows if r.fits and r.time is not None])
    d = cfg.data
    return Plan(cluster=cluster, model_name=model_name, model_source=model_source, adapter=_adapter_label(cfg),
                dtype=cfg.model.dtype, total_params=counts["total"], trainable_params=counts["trainable"],
                parameter_bytes=total_bytes, seq_len=d.seq_len, micro_batch=d.micro_batch_size, grad_accum=grad_accum,
                global_batch=d.batch_size, peft_flops_per_token=peft_flops, config_setting=config_setting,
                main_dp_shard=main, rows=rows, recommended=recommended, seconds=time.perf_counter() - started,
                sampled_depths=ctx.depths if measured else None, unsplittable=unsplittable)


def _split_refusal(model: torch.nn.Module, fmt: str, dp_shard: int) -> str | None:
    """Why ``model``'s adapted weights cannot be stored as ``fmt`` in ``dp_shard`` row blocks (the
    build's own refusal), or None."""
    for name, layer in adapter_layers(model).items():
        try:
            check_quantizable(name, (layer.out_features, layer.in_features), fmt, dp_shard)
        except ConfigError as e:
            return str(e)
    return None


def _sampled_depths(num_layers: int, windows: tuple[int | None, ...], seq_len: int) -> tuple[int, int] | None:
    """`SAMPLED_DEPTHS` where they save time and the blocks are alike; ``None``: the full depth.
    A window shorter than the sequence makes its layers' masks (`models.sliding_window`), so
    layers with and without one differ."""
    if num_layers <= sum(SAMPLED_DEPTHS) or any(w is not None and w < seq_len for w in windows):
        return None
    return SAMPLED_DEPTHS


def _with_depth(model_spec: ModelSpec, depth: int) -> ModelSpec:
    """The same model ``depth`` blocks deep, its first ``depth`` layers' windows."""
    return replace(model_spec, num_layers=depth, windows=model_spec.windows[:depth])


# Predicted step times within this fraction of the fastest count as equal: the model cannot tell them
# apart, and then less traffic, less recompute (selective AC's elementwise recompute has no FLOPs
# in the count but takes time) and less memory decide.
TIME_TIE = 0.01


def _cheapest(fitting: list[Row]) -> Row | None:
    if not fitting:
        return None
    fastest = min(r.time.step_s for r in fitting)
    near = [r for r in fitting if r.time.step_s <= fastest * (1 + TIME_TIE)]
    return min(near, key=lambda r: (r.volume.total("wire"), AC_ORDER.index(r.setting.activation_checkpointing), r.peak))


def _check_cluster(cluster: Cluster) -> None:
    checks = {"--nodes": cluster.nodes, "--gpus-per-node": cluster.gpus_per_node,
              "--gpu-memory-gib": cluster.gpu_memory_gib, "--peak-tflops": cluster.peak_tflops,
              "--intra-gbps": cluster.intra_gbps, "--inter-gbps": cluster.inter_gbps, "--mfu": cluster.mfu}
    for flag, value in checks.items():
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if cluster.mfu > 1:
        raise ConfigError(f"--mfu is a fraction of the peak, at most 1, got {cluster.mfu}")
    if not 0 <= cluster.headroom < 1:
        raise ConfigError(f"--headroom is a fraction of GPU memory in [0, 1), got {cluster.headroom}")
    if cluster.world_size > MAX_WORLD_SIZE:
        raise ConfigError(f"--nodes {cluster.nodes} x --gpus-per-node {cluster.gpus_per_node} = "
                          f"{cluster.world_size} ranks; the planner goes up to {MAX_WORLD_SIZE}")


def _main_dp_shard(resolved: int, candidates: list[int], gpus_per_node: int, world: int, full: bool,
                   fits: dict[int, bool]) -> int:
    """The mesh whose step is measured: the config's own. A replicated base's plan measures one
    node's shard group as well (for the sharded settings); full fine-tuning on a single copy
    measures the largest mesh with two copies instead, so that HSDP's all-reduce between copies
    is in the record. Where the parameters alone do not fit on that mesh, the smallest mesh on
    which they do (so that every setting that can fit is planned from a measured step)."""
    main = resolved if resolved > 1 or world == 1 else max(s for s in candidates if s <= min(gpus_per_node, world))
    if full and main == world and world > 1:
        main = max(s for s in candidates if s < world)
    if not fits[main]:
        main = next((s for s in candidates if s > 1 and fits[s]), main)
    return main


def _reshard_policies(dp_shard: int, full: bool) -> tuple:
    if dp_shard == 1 and not full:
        return (None,)  # nothing is sharded: no policy to choose
    return (True, False)


def _gathered_bytes(param: DTensor, compute_dtype: torch.dtype) -> int:
    """Bytes FSDP2's all-gather sends of this rank's shard of ``param`` (a DTensor): what a tensor
    subclass's own all-gather extension hands FSDP2 (NF4: its codes and scales), an integer
    weight as stored, a floating one cast to ``compute_dtype`` (its mixed precision)."""
    shard = param.to_local()
    if hasattr(shard, "fsdp_pre_all_gather"):
        sent, _ = shard.fsdp_pre_all_gather(param.device_mesh[SHARD])
        return sum(tensor_bytes(t) for t in sent)
    if shard.is_floating_point():
        return shard.numel() * torch.empty((), dtype=compute_dtype).element_size()
    return shard.numel() * shard.element_size()


def _parameter_floor(shards: dict, gathered: bool = False) -> int:
    """Parameters, their gradients and AdamW's two moments (each as large as the trained tensors,
    all fp32): what a rank holds whatever the step; with ``gathered``, also every block unsharded,
    as keeping blocks gathered from forward to backward holds them at the end of the forward. A
    lower bound of the peak that only decides which settings a step is run for."""
    return shards["frozen"] + 4 * shards["trained"] + (shards["gathered"] if gathered else 0)


def _parameters_fit(shards: dict, cluster: Cluster, gathered: bool = False) -> bool:
    return _parameter_floor(shards, gathered) <= cluster.usable_bytes


def _measured_row(setting: Setting, p: StepProfile, ctx: _Context) -> Row:
    volume = step_volume(p.micro_collectives, p.step_collectives, ctx.grad_accum, ctx.cluster.gpus_per_node)
    return Row(setting, "measured", frozen=p.frozen_bytes, trained=p.trained_bytes, grads=p.grad_bytes,
               optimizer=p.optimizer_bytes, gathered=p.gathered_at_peak, activations=p.activation_bytes, logits=p.logits_bytes, peak=p.peak_bytes,
               fits=p.peak_bytes <= ctx.cluster.usable_bytes, volume=volume, breakdown=p.peak_breakdown)


def _derived_row(setting: Setting, p: StepProfile, main: int, shards: dict, groups: dict, ctx: _Context) -> Row:
    """``setting`` on another dp_shard: its own parameter shards, the main mesh's step."""
    mine, theirs = shards[setting.dp_shard], shards[main]
    scale_trained = mine["trained"] / theirs["trained"] if theirs["trained"] else 1.0
    scale_gathered = mine["gathered"] / theirs["gathered"] if theirs["gathered"] else 1.0
    trained = p.trained_bytes + p.grad_bytes + p.optimizer_bytes
    peak = p.peak_bytes + (mine["frozen"] - theirs["frozen"]) + round(trained * scale_trained) - trained
    role = {ranks: name for name, ranks in groups[main].items()}

    def moved(c: Collective) -> Collective:
        name = role.get(c.ranks)
        if name is None:
            raise RuntimeError(f"a collective on ranks {c.ranks[:8]}..., which is no group of the mesh")
        ranks = groups[setting.dp_shard].get(name, (0,))  # a role this mesh lacks: a group of one
        payload = c.payload
        if name == SHARD and c.kind in (ALL_GATHER, REDUCE_SCATTER):
            payload = round(payload * scale_gathered)
        elif name == REPLICATE and c.kind == ALL_REDUCE:
            payload = round(payload * scale_trained)
        return replace(c, payload=payload if len(ranks) > 1 else 0, ranks=ranks)

    volume = step_volume([moved(c) for c in p.micro_collectives], [moved(c) for c in p.step_collectives],
                         ctx.grad_accum, ctx.cluster.gpus_per_node)
    return Row(setting, f"step of dp_shard={main}", frozen=mine["frozen"], trained=mine["trained"],
               grads=round(p.grad_bytes * scale_trained), optimizer=round(p.optimizer_bytes * scale_trained),
               gathered=p.gathered_at_peak, activations=p.activation_bytes, logits=p.logits_bytes, peak=peak,
               fits=peak <= ctx.cluster.usable_bytes, volume=volume)


def _parameters_row(setting: Setting, shards: dict, gathered: bool) -> Row:
    return Row(setting, "gathered model only" if gathered else "parameters only", frozen=shards["frozen"],
               trained=shards["trained"], grads=shards["trained"], optimizer=2 * shards["trained"],
               gathered=shards["gathered"] if gathered else None, activations=None, logits=None,
               peak=_parameter_floor(shards, gathered), fits=False)


def _recompute_flops(setting: Setting, measured: dict) -> float:
    """AC's recompute per micro-batch: the measured step's FLOPs over those of the same mesh and
    policy without AC (FlopCounterMode on the fake step)."""
    base = measured.get(replace(setting, activation_checkpointing="none"))
    return max(0.0, measured[setting].flops - base.flops) if base is not None else 0.0


def _adapter_label(cfg: TrainConfig) -> str:
    a = cfg.adapter
    if a.kind == FULL:
        return "full fine-tuning"
    return f"{'PMSS k' if a.kind == 'pmss' else 'LoRA r'}={a.rank}"
