"""The training job: build on meta, shard, load the base, select skeletons, train, save.

One code path for 1..N processes on CPU (gloo) and GPU (NCCL). The loss of a step is the summed
token cross-entropy of the *global* batch divided by its token count, so losses and updates do
not depend on the world size or the accumulation split.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchtune.training import set_default_dtype

from pmss_dist import checkpoint as ckpt
from pmss_dist import data as data_lib
from pmss_dist.adapter_io import save_adapter
from pmss_dist.adapters import (FULL, AdapterSpec, PMSSLinear, adapter_layers, apply_adapters, assign_skeletons,
                                reset_adapters)
from pmss_dist.builtin import write_tiny_checkpoint
from pmss_dist.config import TrainConfig, check_world_size, to_dict
from pmss_dist.dist_env import DistEnv, init_distributed, shutdown
from pmss_dist.evaluation import evaluate_loss
from pmss_dist.files import atomic_write
from pmss_dist.hf_checkpoint import load_hf_weights, read_hf_config
from pmss_dist.hf_export import export_full, export_merged
from pmss_dist.metrics import MetricsLogger, peak_flops, peak_memory_gib, peft_flops_per_token
from pmss_dist.models import build_model, init_rope_caches
from pmss_dist.parallelize import (all_reduce_grads, clip_grad_norm, parallelize, rank_memory_bytes,
                                   replicated_parameters, resolve_reshard_after_forward, trainable_parameters)

BUILTIN_TINY = "builtin:tiny"


# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving: "try again later" (EX_TEMPFAIL).
# launch/slurm requeues the job on it.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    pass


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 (SLURM's warning before the time limit, or preemption) so the
    current step finishes and every rank saves, instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none): all ranks stop at the same step."""
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def resolve_base_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    if cfg.model.path != BUILTIN_TINY:
        return Path(cfg.model.path)
    base = Path(cfg.output_dir) / "base_model"
    if env.is_main:
        write_tiny_checkpoint(base, seed=0)
    dist.barrier()
    return base


def lr_lambda(cfg: TrainConfig):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _flops_per_token(model, hf_config: dict, seq_len: int) -> float:
    frozen = adapter = 0
    adapter_tensors = set(replicated_parameters(model))
    for name, p in model.named_parameters():
        if p.dim() != 2 or "tok_embeddings" in name or p in adapter_tensors:
            continue
        if p.requires_grad:  # full fine-tuning: a trained GEMM costs 6N like an adapter's
            adapter += 2 * p.numel()
        else:
            frozen += p.numel()
    for layer in adapter_layers(model).values():
        if isinstance(layer, PMSSLinear):  # core + one skeleton GEMM on the narrower side
            adapter += 2 * (layer.rank * layer.rank + layer.rank * min(layer.in_features, layer.out_features))
        else:
            adapter += 2 * layer.rank * (layer.in_features + layer.out_features)
    return peft_flops_per_token(frozen, adapter, hf_config["num_hidden_layers"], hf_config["hidden_size"], seq_len)


@dataclass
class Run:
    """Everything a training run holds once it is set up (``setup``) and ready to ``fit``."""

    cfg: TrainConfig
    env: DistEnv
    model: torch.nn.Module
    params: list  # everything the optimizer steps
    replicated: list  # the adapters' tensors among them, whose gradients `all_reduce_grads` sums
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: data_lib.GlobalBatchSampler
    dataset: list
    tokenizer: object
    manager: ckpt.CheckpointManager
    base_dir: Path
    hf_config: dict
    fingerprint: str
    counts: dict
    grad_accum: int
    start_step: int = 0
    losses: list = field(default_factory=list)
    eval_batches: list = field(default_factory=list)  # this rank's held-out batches (data.eval_source)
    eval_losses: list = field(default_factory=list)  # [step, loss] pairs of this run


def train(cfg: TrainConfig) -> dict:
    stop = StopRequest()  # before the slow start-up, so an early SIGUSR1 still ends in a save
    env = init_distributed()
    try:
        summary = fit(setup(cfg, env), stop)
    finally:
        stop.restore()
    # Only a run that ended normally meets its peers at the exit barrier; a failing rank exits
    # at once and torchrun stops the others, rather than all waiting on each other.
    shutdown()
    return summary


def _select_or_load_skeletons(model, cfg: TrainConfig, env: DistEnv, fingerprint: str, out: Path) -> None:
    """Skeleton indices come from ``adapter.selection_file`` when it exists (refused if made for
    another base or config), else are computed and written to ``<output_dir>/selection.json``."""
    from pmss_dist.selection import load_selection, save_selection

    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, PMSSLinear)}
    key = dict(method=cfg.adapter.method, rank=cfg.adapter.rank, seed=cfg.seed, base_fingerprint=fingerprint)
    given = Path(cfg.adapter.selection_file) if cfg.adapter.selection_file else None
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    selections = None
    if given is not None and given.is_file():
        selections = load_selection(given, shapes=shapes, **key)
        if env.is_main:
            print(f"reusing skeleton selection from {given}", file=sys.stderr, flush=True)
    selections = assign_skeletons(model, cfg.adapter.method, seed=cfg.seed, svd=cfg.adapter.svd,
                                  selections=selections, progress=env.is_main)
    if env.is_main:
        save_selection(out / "selection.json", selections, shapes=shapes, **key)
        if given is not None and not given.is_file():
            given.parent.mkdir(parents=True, exist_ok=True)
            save_selection(given, selections, shapes=shapes, **key)
    dist.barrier()


def _resume_path(cfg: TrainConfig, manager: ckpt.CheckpointManager) -> Path | None:
    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        return manager.newest_valid()
    path = Path(cfg.checkpoint.resume)
    ckpt.verify(path)  # an explicitly named checkpoint must be whole: no silent fallback
    return path


def setup(cfg: TrainConfig, env: DistEnv) -> Run:
    """Build on meta, shard, load the base shard by shard, then resume or select skeletons."""
    grad_accum = check_world_size(cfg, env.world_size)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base_dir(cfg, env)
    hf_config = read_hf_config(base_dir)
    fingerprint = ckpt.base_fingerprint(base_dir)
    dtype = getattr(torch, cfg.model.dtype)
    # Full fine-tuning keeps fp32 master weights (sharded) and computes in model.dtype through
    # FSDP's mixed precision; adapters keep their own fp32 tensors over a frozen base in model.dtype.
    storage_dtype = torch.float32 if cfg.adapter.kind == FULL else dtype

    with torch.device("meta"), set_default_dtype(storage_dtype):
        model = build_model(hf_config, max_seq_len=cfg.data.seq_len)
    counts = apply_adapters(model, AdapterSpec(cfg.adapter.kind, tuple(cfg.adapter.targets),
                                               cfg.adapter.rank, cfg.adapter.alpha))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = rank_memory_bytes(env.device)
    reshard = resolve_reshard_after_forward(cfg.parallel.reshard_after_forward, model_bytes, memory)
    if env.is_main and cfg.parallel.reshard_after_forward == "auto":
        print(f"parallel.reshard_after_forward=auto -> {str(reshard).lower()} (model {model_bytes / 2**30:.2f} GiB, "
              f"rank memory {memory / 2**30:.0f} GiB)", file=sys.stderr, flush=True)
    parallelize(model, env.mesh, param_dtype=dtype, compile=cfg.parallel.compile,
                activation_checkpointing=cfg.parallel.activation_checkpointing, reshard_after_forward=reshard)
    model.to_empty(device=env.device)
    init_rope_caches(model, env.device)
    load_hf_weights(model, base_dir, hf_config)
    reset_adapters(model, cfg.seed)

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    tokenizer = data_lib.load_tokenizer(base_dir)
    dataset = data_lib.build_dataset(cfg.data, tokenizer, seed=cfg.seed)
    sampler = data_lib.GlobalBatchSampler(len(dataset), cfg.data.batch_size, cfg.seed)
    manager = ckpt.CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, env.rank,
                                     cfg.checkpoint.async_save)
    run = Run(cfg, env, model, params, replicated_parameters(model), optimizer, scheduler, sampler, dataset,
              tokenizer, manager, base_dir, hf_config, fingerprint, counts, grad_accum)
    if cfg.data.eval_every:
        eval_set = data_lib.build_eval_dataset(cfg.data, tokenizer, seed=cfg.seed)
        run.eval_batches = data_lib.eval_micro_batches(
            eval_set, env.rank, env.world_size, cfg.data.micro_batch_size, cfg.data.seq_len, tokenizer.pad_id,
            max_samples=cfg.data.eval_batches * cfg.data.batch_size)

    manager.clean_partials()
    resume_from = _resume_path(cfg, manager)
    if resume_from is not None:
        # Indices, cores and optimizer state all come from the checkpoint: no selection to redo.
        extra = ckpt.load(resume_from, model, optimizer)
        if extra["base_fingerprint"] != fingerprint:
            raise ckpt.CheckpointError(f"{resume_from} was trained on a base with fingerprint "
                                       f"{extra['base_fingerprint']}, {base_dir} has {fingerprint}: "
                                       "point model.path at the original base or set checkpoint.resume=none")
        scheduler.load_state_dict(extra["scheduler"])
        sampler.load_state_dict(extra["sampler"])
        run.start_step, run.losses = extra["step"], extra["losses"]
        if env.is_main:
            print(f"resumed from {resume_from} at step {run.start_step}", file=sys.stderr, flush=True)
    elif cfg.adapter.kind == "pmss":
        _select_or_load_skeletons(model, cfg, env, fingerprint, out)
    return run


def train_step(run: Run) -> tuple[float, float, float]:
    """One optimizer step on the next global batch; returns (loss, grad norm, global tokens)."""
    cfg, env = run.cfg, run.env
    micro = data_lib.rank_micro_batches(run.sampler.next_batch(), env.rank, env.world_size,
                                        cfg.data.micro_batch_size)
    batches = [data_lib.collate([run.dataset[i] for i in mb], cfg.data.seq_len, run.tokenizer.pad_id)
               for mb in micro]
    assert len(batches) == run.grad_accum
    counts = torch.tensor([sum(int((b["labels"] != data_lib.IGNORE_INDEX).sum()) for b in batches),
                           sum(b["tokens"].numel() for b in batches)], device=env.device, dtype=torch.float64)
    dist.all_reduce(counts)
    global_targets, global_tokens = counts.tolist()
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float32)
    for batch in batches:
        # Packed batches carry per-document attention masks and positions that restart at 0.
        packed = {k: batch[k].to(env.device) for k in ("mask", "input_pos") if k in batch}
        logits = run.model(batch["tokens"].to(env.device), **packed)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(env.device).flatten(),
                               ignore_index=data_lib.IGNORE_INDEX, reduction="sum")
        (loss / global_targets).backward()
        loss_sum += loss.detach()
    all_reduce_grads(run.replicated)
    dist.all_reduce(loss_sum)
    step_loss = loss_sum.item() / global_targets
    if not math.isfinite(step_loss):
        raise NonFiniteLossError(f"loss is {step_loss} at step {run.sampler.step}: stopped before the optimizer "
                                 "step, the last checkpoint is untouched; lower optim.lr or check the data")
    grad_norm = clip_grad_norm(run.params, cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return step_loss, float(grad_norm), global_tokens


def save_checkpoint(run: Run, step: int) -> None:
    # The resolved config and the skeleton selection travel with every checkpoint, so one can be
    # inspected or exported without the run directory around it.
    selection = Path(run.cfg.output_dir) / "selection.json"
    extra = {"step": step, "losses": list(run.losses), "scheduler": run.scheduler.state_dict(),
             "config": to_dict(run.cfg), "selection": json.loads(selection.read_text()) if selection.is_file() else None,
             "sampler": run.sampler.state_dict(), "base_fingerprint": run.fingerprint}
    run.manager.save(step, run.model, run.optimizer, extra)


def fit(run: Run, stop: StopRequest) -> dict:
    """Train from ``run.start_step`` to ``max_steps`` (or until a stop signal), checkpointing on the
    way; rank 0 then writes the adapter, the resolved config and ``summary.json``."""
    cfg, env = run.cfg, run.env
    out = Path(cfg.output_dir)
    logger = MetricsLogger(out, env.is_main, cfg.log.tensorboard)
    flops_per_token = _flops_per_token(run.model, run.hf_config, cfg.data.seq_len)
    peak = peak_flops(env.device)
    tokens_seen, stopped_by = 0, 0
    t_last, steps_since_log = time.perf_counter(), 0
    run.model.train()
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        step_loss, grad_norm, global_tokens = train_step(run)
        run.losses.append(step_loss)
        tokens_seen += int(global_tokens)
        steps_since_log += 1
        if step % cfg.log.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            tps = steps_since_log * global_tokens / (now - t_last)
            t_last, steps_since_log = now, 0
            scalars = {"train/loss": step_loss, "train/lr": run.scheduler.get_last_lr()[0],
                       "train/grad_norm": grad_norm, "perf/tokens_per_s": tps,
                       "perf/tokens_per_s_per_device": tps / env.world_size}
            if peak:
                scalars["perf/mfu"] = tps / env.world_size * flops_per_token / peak
            mem = peak_memory_gib(env.device)
            if mem is not None:
                scalars["perf/peak_memory_gib"] = mem
            logger.log(step, cfg.max_steps, scalars)
        if cfg.data.eval_every and (step % cfg.data.eval_every == 0 or step == cfg.max_steps):
            eval_loss = evaluate_loss(run.model, run.eval_batches, env.device)  # collective: every rank
            run.eval_losses.append([step, eval_loss])
            logger.log(step, cfg.max_steps, {"eval/loss": eval_loss})
        stopped_by = stop.agreed(env.device)
        every = cfg.checkpoint.every_steps
        if stopped_by or step == cfg.max_steps or (every and step % every == 0):
            save_checkpoint(run, step)
        if stopped_by:
            break
    run.manager.finish_pending()
    logger.close()

    losses = run.losses
    summary = {"initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "losses": losses, "steps": len(losses), "completed": not stopped_by,
               "stopped_by_signal": signal.Signals(stopped_by).name if stopped_by else None,
               "trainable_params": run.counts["trainable"], "total_params": run.counts["total"],
               "world_size": env.world_size, "tokens_seen_this_run": tokens_seen, "adapter": cfg.adapter.kind,
               "eval_losses": run.eval_losses}
    full = cfg.adapter.kind == FULL
    if env.is_main:
        if not full:  # a full fine-tuning run's weights are its checkpoints (and merged/)
            meta = {"kind": cfg.adapter.kind, "rank": cfg.adapter.rank, "alpha": cfg.adapter.alpha,
                    "targets": cfg.adapter.targets, "method": cfg.adapter.method, "base_model": str(run.base_dir),
                    "base_fingerprint": run.fingerprint}
            save_adapter(run.model, out / "adapter", meta)
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(to_dict(cfg), indent=2)))
    dist.barrier()
    if cfg.export_merged and not stopped_by:
        # The servable result in the base's own file layout: the base with the adapter folded in,
        # or the fully trained weights read back from the final checkpoint. Each rank writes a
        # share of the weight files, one tensor (adapter) or one file (full) in memory at a time.
        if full:
            export_full(run.manager.root / ckpt.step_name(cfg.max_steps), run.base_dir, out / "merged",
                        progress=env.is_main, rank=env.rank, world_size=env.world_size)
        else:
            export_merged(out / "adapter", run.base_dir, out / "merged", progress=env.is_main,
                          rank=env.rank, world_size=env.world_size)
        dist.barrier()
    if env.is_main:  # written last: its presence means everything above is on disk
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    dist.barrier()
    return summary
