"""The training job: build on meta, shard, load the base, select skeletons, train, save.

One code path for 1..N processes on CPU (gloo) and GPU (NCCL). The loss of a step is the summed
token cross-entropy of the *global* batch divided by its token count, so losses and updates do
not depend on the world size or the accumulation split.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from pmss_dist.errors import ConfigError, DivergenceError
from pmss_dist.adapters.io import adapter_meta, save_adapter
from pmss_dist.adapters.layers import FULL, PMSSLinear, adapter_layers, assign_skeletons, count_parameters
from pmss_dist.adapters.selection import load_selection, save_selection
from pmss_dist.build import build_model, parameter_bytes
from pmss_dist.config import (BUILTIN_TINY, TrainConfig, adapter_spec, check_seq_len, check_world_size,
                              run_identity, to_dict)
from pmss_dist.data import batches as batch_lib
from pmss_dist.data import examples as data_lib
from pmss_dist.data.fingerprint import samples_fingerprint, tokenizer_fingerprint
from pmss_dist.data.rows import DataError
from pmss_dist.data.tokenizers import load_tokenizer
from pmss_dist.eval.loss import evaluate_loss
from pmss_dist.eval.preference import (PREFERENCE_STATS, PreferenceLoss, batch_reference, evaluate_preference,
                                      preference_loss, reference_logps, steps_run_reference_forward)
from pmss_dist.files import begin_staged, file_sha256, publish_dir, publish_staged, staging_dir
from pmss_dist.hf.export import ORIGINAL_WEIGHTS, TrainedBase, verify_hf_export, write_full, write_merged
from pmss_dist.hf.load import original_weights, read_model_spec
from pmss_dist.models.builtin import write_tiny_checkpoint
from pmss_dist.models.spec import ModelSpec
from pmss_dist.console import print_main
from pmss_dist.parallel.env import DistEnv, init_distributed, shutdown
from pmss_dist.parallel.grads import replicated_parameters, trainable_parameters
from pmss_dist.parallel.mesh import ParallelDims, local_world_size
from pmss_dist.parallel.parallelize import rank_memory_bytes
from pmss_dist.checkpoints.fingerprint import (CACHE_MIN_BYTES, base_fingerprint, cached_fingerprint,
                                               header_fingerprint, weight_bytes, weight_file_names)
from pmss_dist.checkpoints.record import step_name
from pmss_dist.checkpoints.selection_cache import SelectionCache
from pmss_dist.train import step as step_lib
from pmss_dist.train.checkpoint import DATA_KEY, EXAMPLES_KEY, TOKENIZER_KEY, CheckpointManager
from pmss_dist.train.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_gib
from pmss_dist.train.run_dir import RunDir, RunDirError, RunLock


# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving: "try again later" (EX_TEMPFAIL).
# launch/slurm requeues the job on it.
EXIT_REQUEUE = 75


# Divergence: a loss above `divergence_factor` times the mean of this many recent losses.
DIVERGENCE_WINDOW = 10


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 (SLURM's warning before the time limit, or preemption) so the
    current step finishes and every rank saves, instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        for sig in step_lib.STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        for sig in step_lib.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def resolve_base_dir(cfg: TrainConfig, run_dir: RunDir, env: DistEnv) -> Path:
    base = run_dir.base_dir(cfg.model.path)
    if cfg.model.path == BUILTIN_TINY:
        if env.is_main:
            publish_dir(base, lambda staging: write_tiny_checkpoint(staging, seed=0))
        dist.barrier()
    return base


def claim_output_dir(cfg: TrainConfig, run_dir: RunDir, env: DistEnv) -> None:
    """Before anything is written: refuse an output_dir that overlaps the base checkpoint, create
    it and take its lock (rank 0), and agree on the outcome, so every rank stops with the same
    one-line error."""
    error = None
    if env.is_main:
        try:
            run_dir.check_outside(cfg.model.path, cfg.adapter.selection_file)
            run_dir.root.mkdir(parents=True, exist_ok=True)
            note = RunLock(run_dir.lock).acquire()
            if note:
                print_main(note)
            left = run_dir.reopen()
            if left:
                print_main(f"note: removed what a killed write left in {run_dir.root}: {', '.join(left)}")
        except (RunDirError, OSError) as err:
            error = str(err) if isinstance(err, RunDirError) else f"cannot use output_dir={cfg.output_dir}: {err}"
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise RunDirError(verdict[0])


def release_output_dir(cfg: TrainConfig, env: DistEnv) -> None:
    if env.is_main:
        RunLock(RunDir(cfg.output_dir).lock).release()


def agreed_fingerprint(base_dir: Path, env: DistEnv) -> str:
    """The base's content fingerprint (`checkpoints.fingerprint.base_fingerprint`), the same on
    every rank: from the cache when its files are unchanged, else each rank hashes every
    world_size-th weight file and rank 0 combines (and caches) them."""
    found = [cached_fingerprint(base_dir) if env.is_main else None]
    dist.broadcast_object_list(found, src=0)
    if found[0]:
        return found[0]
    start = time.perf_counter()
    names = weight_file_names(base_dir)
    mine = {name: file_sha256(base_dir / name) for name in names[env.rank::env.world_size]}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    digests = {name: digest for part in gathered for name, digest in part.items()}
    result = [base_fingerprint(base_dir, digests) if env.is_main else None]
    dist.broadcast_object_list(result, src=0)
    size = weight_bytes(base_dir)
    if size >= CACHE_MIN_BYTES:
        print_main(f"base fingerprint {result[0]}: hashed {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f}s"
                   " (cached for the next runs)")
    return result[0]


def optimizer_settings(cfg: TrainConfig) -> dict:
    """AdamW's settings from the config (the learning rate is the schedule's peak)."""
    return {"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}


def apply_optimizer_settings(run: Run) -> None:
    """After a resume, the configured optimizer settings and lr schedule hold from the resumed step
    on. Loading restored each parameter group's lr, betas, eps and weight decay and LambdaLR's
    base lrs from the checkpoint, so an ``optim.lr`` given on resume was silently ignored; the
    checkpoint manager logs what changed. With an unchanged config every value is bit-identical
    to the restored one (the same ``base_lr * factor(step)`` the scheduler computes)."""
    settings, factor = optimizer_settings(run.cfg), lr_lambda(run.cfg)
    step = run.scheduler.last_epoch
    for group in run.optimizer.param_groups:
        group.update(betas=settings["betas"], eps=settings["eps"], weight_decay=settings["weight_decay"],
                     initial_lr=settings["lr"], lr=settings["lr"] * factor(step))
    run.scheduler.base_lrs = [settings["lr"]] * len(run.optimizer.param_groups)
    run.scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]


def divergence(loss: float, grad_norm: float | None, recent: list[float], factor: float) -> str | None:
    """Why a step's ``loss`` (and gradient norm) is not sane, or None: not finite, or above
    ``factor`` times the mean of the last `DIVERGENCE_WINDOW` ``recent`` losses (``factor`` 0: no
    such test)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    window = recent[-DIVERGENCE_WINDOW:]
    if factor and window:
        mean = sum(window) / len(window)
        if loss > factor * mean:
            return (f"the loss {loss:.4g} is above checkpoint.divergence_factor={factor:g} x the mean of the "
                    f"last {len(window)} losses ({mean:.4g})")
    return None


def lr_lambda(cfg: TrainConfig):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class Run:
    """Everything a training run holds once it is set up (``setup``) and ready to ``fit``."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: RunDir
    model: torch.nn.Module
    params: list  # everything the optimizer steps
    replicated: list  # the adapters' tensors among them, whose gradients `all_reduce_grads` sums
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: batch_lib.GlobalBatchSampler
    dataset: list
    tokenizer: object
    checkpoints: CheckpointManager
    base_dir: Path
    model_spec: ModelSpec
    fingerprint: str
    grad_accum: int
    preference: PreferenceLoss | None  # a dpo run's loss; None: the token loss
    start_step: int = 0
    losses: list = field(default_factory=list)
    eval_batches: list = field(default_factory=list)  # this rank's held-out batches (data.eval_source)
    eval_losses: list = field(default_factory=list)  # [step, loss] pairs of this run
    eval_metrics: list = field(default_factory=list)  # a dpo run's [step, {name: value}] of its evals
    reference: torch.Tensor | None = None  # objective.precompute_reference: every pair's reference scores


def train(cfg: TrainConfig) -> dict:
    stop = StopRequest()  # before the slow start-up, so an early SIGUSR1 still ends in a save
    env = init_distributed()
    try:
        summary = fit(setup(cfg, env), stop)
    finally:
        stop.restore()
        release_output_dir(cfg, env)
    # Only a run that ended normally meets its peers at the exit barrier; a failing rank exits
    # at once and torchrun stops the others, rather than all waiting on each other.
    shutdown()
    return summary


def _select_or_load_skeletons(run: Run) -> None:
    """Skeleton indices come from ``adapter.selection_file`` when it exists (refused if made for
    another base or config), else from the user cache when an earlier run on this base cached them
    (`SelectionCache`), else are computed and cached; either way they are written to the run's
    ``selection.json`` (and to ``adapter.selection_file`` when it names a file not there yet)."""
    cfg, env = run.cfg, run.env
    layers = {n: m for n, m in adapter_layers(run.model).items() if isinstance(m, PMSSLinear)}
    key = dict(method=cfg.adapter.method, k=cfg.adapter.rank, seed=cfg.seed, base_fingerprint=run.fingerprint)
    given = Path(cfg.adapter.selection_file) if cfg.adapter.selection_file else None
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    # model.quantize is not in the key: a quantized base is selected on its original weights.
    cache = SelectionCache(dtype=cfg.model.dtype, device=env.device.type, svd=cfg.adapter.svd, shapes=shapes, **key)
    selections = None
    if given is not None and given.is_file():
        try:
            selections = load_selection(given, shapes=shapes, header_fingerprint=header_fingerprint(run.base_dir),
                                        **key)
        except ValueError as err:  # made for another base or config, or not a selection file
            raise ConfigError(f"adapter.selection_file: {err}") from None
        print_main(f"reusing skeleton selection from {given}")
    else:
        found = [cache.load() if env.is_main else None]  # the cache of rank 0's machine
        dist.broadcast_object_list(found, src=0)
        selections = found[0]
        if selections is not None:
            print_main(f"reusing skeleton selection from the cache: {cache.path}")
    selected = selections is None
    # A quantized base is selected on its original weights, read again from the base's files.
    original = original_weights(run.model, run.base_dir, run.model_spec) if cfg.model.quantize != "none" else None
    selections = assign_skeletons(run.model, cfg.adapter.method, seed=cfg.seed, svd=cfg.adapter.svd,
                                  selections=selections, progress=env.is_main, original=original)
    if env.is_main:
        save_selection(run.run_dir.selection, selections, shapes=shapes, **key)
        if given is not None and not given.is_file():
            save_selection(given, selections, shapes=shapes, **key)
        if selected:
            cache.store(selections)
    dist.barrier()


def setup(cfg: TrainConfig, env: DistEnv) -> Run:
    """Build on meta, shard, load the base shard by shard, then resume or select skeletons."""
    grad_accum = check_world_size(cfg, env.world_size)
    torch.manual_seed(cfg.seed)
    run_dir = RunDir(cfg.output_dir)
    claim_output_dir(cfg, run_dir, env)
    base_dir = resolve_base_dir(cfg, run_dir, env)
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path} has no config.json: point it at a Hugging Face checkpoint "
                          f"directory (config.json and *.safetensors) or use {BUILTIN_TINY}")
    model_spec = read_model_spec(base_dir)
    check_seq_len(cfg, model_spec)  # before the RoPE caches and batches of seq_len are made
    fingerprint = agreed_fingerprint(base_dir, env)
    spec, dtype = adapter_spec(cfg), getattr(torch, cfg.model.dtype)
    dims = ParallelDims.resolve(cfg.parallel, env.world_size, local_world_size(),
                                parameter_bytes(model_spec, adapter=spec, dtype=dtype), rank_memory_bytes(env.device))
    print_main(f"data-parallel mesh: dp_replicate={dims.replicate} x dp_shard={dims.shard}")
    mesh = dims.training_mesh(env.device.type, full_finetune=spec.kind == FULL)
    model = build_model(model_spec, adapter=spec, mesh=mesh, device=env.device, dtype=dtype, parallel=cfg.parallel,
                        weights=base_dir, max_seq_len=cfg.data.seq_len, seed=cfg.seed)

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, **optimizer_settings(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    tokenizer = load_tokenizer(base_dir)
    preference = preference_loss(cfg.objective)
    dataset = data_lib.build_dataset(cfg.data, tokenizer, seed=cfg.seed, pairs=preference is not None)
    sampler = batch_lib.GlobalBatchSampler(len(dataset), cfg.data.batch_size, cfg.seed)
    checkpoints = CheckpointManager(run_dir.checkpoints, cfg.checkpoint, env.rank, model=model, optimizer=optimizer,
                                    scheduler=scheduler, sampler=sampler, config=to_dict(cfg), base_dir=base_dir,
                                    base_fingerprint=fingerprint, selection_file=run_dir.selection,
                                    identity={**run_identity(to_dict(cfg)), EXAMPLES_KEY: len(dataset),
                                              DATA_KEY: samples_fingerprint(dataset),
                                              TOKENIZER_KEY: tokenizer_fingerprint(base_dir)})
    run = Run(cfg, env, run_dir, model, params, replicated_parameters(model), optimizer, scheduler, sampler, dataset,
              tokenizer, checkpoints, base_dir, model_spec, fingerprint, grad_accum, preference)
    if cfg.data.eval_every:
        eval_set = data_lib.build_eval_dataset(cfg.data, tokenizer, seed=cfg.seed, pairs=preference is not None)
        run.eval_batches = batch_lib.eval_micro_batches(
            eval_set, env.rank, env.world_size, cfg.data.micro_batch_size, cfg.data.seq_len, tokenizer.pad_id,
            max_samples=cfg.data.eval_batches * cfg.data.batch_size)

    checkpoints.clean_partials()
    # Indices, cores and optimizer state of a resumed run all come from its checkpoint.
    record = checkpoints.resume()
    if record is not None:
        run.start_step, run.losses = record.step, record.losses
        apply_optimizer_settings(run)
    elif cfg.adapter.kind == "pmss":
        _select_or_load_skeletons(run)
    if cfg.objective.precompute_reference:
        run.reference = precompute_reference(run)
    return run


def precompute_reference(run: Run) -> torch.Tensor:
    """Every training pair's reference scores, in one pass over the dataset before the first step
    (`eval.preference.reference_logps`); the steps then run no reference forward. Recomputed on
    resume: the same base, samples and micro-batches give the same scores."""
    cfg, env = run.cfg, run.env
    started = time.perf_counter()
    table = reference_logps(run.model, run.dataset, env.device, env.rank, env.world_size, cfg.data.micro_batch_size,
                            cfg.data.seq_len, run.tokenizer.pad_id)
    reshard(run.model)
    print_main(f"reference log-probs of {len(run.dataset)} pairs computed in {time.perf_counter() - started:.2f}s")
    return table


def rank_batches(run: Run, global_indices: list[int]) -> list[dict]:
    """This rank's collated micro-batches of a global batch."""
    cfg, env = run.cfg, run.env
    micro = batch_lib.rank_micro_batches(global_indices, env.rank, env.world_size, cfg.data.micro_batch_size)
    batches = [batch_lib.collate_samples([run.dataset[i] for i in mb], cfg.data.seq_len, run.tokenizer.pad_id)
               for mb in micro]
    if run.reference is not None:
        for batch, mb in zip(batches, micro):
            batch["reference"] = batch_reference(run.reference, mb)
    return batches


def train_step(run: Run, signum: int) -> step_lib.Unread:
    """One optimizer step on the next global batch, its outcome left on the device (`step_lib`):
    the host reads it at the next read point (`settle`). The first step of a fresh run is read
    before its update, so that a base holding NaN is reported as such, not as a divergence."""
    cfg, env = run.cfg, run.env
    batches = rank_batches(run, run.sampler.next_batch())
    assert len(batches) == run.grad_accum
    step = run.sampler.step
    targets = step_lib.global_targets(step_lib.loss_units(batches, run.preference), env.device)
    sums = step_lib.micro_steps(run.model, batches, env.device, targets, run.preference)
    if run.start_step == 0 and step == 1:  # nothing updated yet: every weight is the base's
        first = step_lib.agree(step, sums, 0, targets, torch.zeros((), device=env.device))
        check_outcome(run, step_lib.read([first])[0], trainable_too=True)
    grad_norm = step_lib.reduce_and_clip(run.params, run.replicated, cfg.optim.grad_clip)
    step_lib.update(run.optimizer)
    run.scheduler.step()
    return step_lib.agree(step, sums, signum, targets, grad_norm)


def check_outcome(run: Run, outcome: step_lib.Outcome, trainable_too: bool = False) -> None:
    """Refuse a step whose loss or gradient norm is not sane (`divergence`): as the base's fault
    when its loss is not finite because the base holds NaN or Inf, else as a divergence."""
    cfg = run.cfg
    if not outcome.targets:
        what = "pair with trained tokens on both sides" if run.preference else "trained token"
        raise DataError(f"the global batch of step {outcome.step} has no {what}: data.seq_len="
                        f"{cfg.data.seq_len} cuts its samples before their responses; raise data.seq_len")
    norm = outcome.grad_norm if math.isfinite(outcome.loss) else None
    reason = divergence(outcome.loss, norm, run.losses, divergence_factor(run))
    if not reason:
        return
    damaged = None if math.isfinite(outcome.loss) else nonfinite_base_weight(run.model, trainable_too=trainable_too)
    if damaged:
        raise ConfigError(f"model.path={cfg.model.path}: the base checkpoint holds non-finite values (NaN or "
                          f"Inf) in {damaged}; it is damaged: convert or download it again")
    raise DivergenceError(f"training diverged at step {outcome.step}: {reason}")


def divergence_factor(run: Run) -> float:
    """``checkpoint.divergence_factor``, for the token loss only: a preference loss falls towards 0
    as the pairs are learnt, where ten times a tiny mean is no sign of divergence."""
    return 0.0 if run.preference else run.cfg.checkpoint.divergence_factor


def settle(run: Run, unread: list[step_lib.Unread]) -> step_lib.Outcome | None:
    """A read point: the steps not read yet, read in one transfer and checked in order (every
    rank alike: the values are all-reduced); their losses join ``run.losses``. Returns the last."""
    outcomes = step_lib.read(unread)
    unread.clear()
    for outcome in outcomes:
        check_outcome(run, outcome)
        run.losses.append(outcome.loss)
    return outcomes[-1] if outcomes else None


def nonfinite_base_weight(model: torch.nn.Module, trainable_too: bool) -> str | None:
    """The first frozen weight (and trainable one, before any update), by name, that holds NaN or
    Inf on any rank, or None (collective). Asked only when a loss is not finite: a damaged base is
    the user's to fix, not a divergence. Quantized weights are not looked at."""
    mine = None
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if ((trainable_too or not param.requires_grad) and type(local.data) is torch.Tensor
                and not torch.isfinite(local).all()):
            mine = name
            break
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    return next((name for name in found if name), None)


def probe_loss(run: Run) -> float:
    """The loss of the current weights on the next global batch, forward only: the sanity check
    of the last update when no step follows it (the last step, a stop)."""
    batches = rank_batches(run, run.sampler.peek_batch())
    loss = evaluate(run, batches)["loss"]
    reshard(run.model)
    return loss


def reshard(model: torch.nn.Module) -> None:
    """After forwards with no backward: blocks kept gathered for one (reshard_after_forward=False,
    and always the root) would stay unsharded, holding the whole base on every rank."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def evaluate(run: Run, batches: list[dict]) -> dict[str, float]:
    """The loss of ``batches`` (collective: every rank, as many batches), and a dpo run's
    `PREFERENCE_STATS`."""
    if run.preference is not None:
        return evaluate_preference(run.model, batches, run.env.device, run.preference)
    return {"loss": evaluate_loss(run.model, batches, run.env.device)}


def preference_scalars(prefix: str, stats: dict[str, float]) -> dict[str, float]:
    """A dpo run's statistics as TRL names them, with the margin."""
    margins = stats["rewards/chosen"] - stats["rewards/rejected"]
    return {f"{prefix}{name}": stats[name] for name in PREFERENCE_STATS} | {f"{prefix}rewards/margins": margins}


def fit(run: Run, stop: StopRequest) -> dict:
    """Train from ``run.start_step`` to ``max_steps`` (or until a stop signal), then finish the run:
    its adapter, resolved config, merged export and ``summary.json``."""
    stopped_by, tokens_seen = train_loop(run, stop)
    return finish(run, stopped_by, tokens_seen)


def train_loop(run: Run, stop: StopRequest) -> tuple[int, int]:
    """The steps, logging, eval and checkpoints as the checkpoint manager's policy says. Returns the
    stop signal that ended the loop (0: it reached ``max_steps``) and the tokens it trained on."""
    cfg, env, run_dir = run.cfg, run.env, run.run_dir
    logger = MetricsLogger(run_dir.tensorboard if cfg.log.tensorboard else None, env.is_main)
    model_flops_per_token = flops_per_token(run.model, run.model_spec, cfg.data.seq_len,
                                            reference_forward=steps_run_reference_forward(cfg.objective))
    peak = peak_flops(env.device)
    tokens_seen, stopped_by = 0, 0
    t_last, steps_since_log = time.perf_counter(), 0
    rows_per_sample = 2 if run.preference else 1  # a pair is two rows
    global_tokens = cfg.data.batch_size * rows_per_sample * cfg.data.seq_len  # collation pads every row to seq_len
    unread: list[step_lib.Unread] = []
    run.model.train()
    try:
        for step in range(run.start_step + 1, cfg.max_steps + 1):
            unread.append(train_step(run, stop.signum))
            tokens_seen += global_tokens
            steps_since_log += 1
            logging = step % cfg.log.log_every == 0 or step == cfg.max_steps
            evaluating = bool(cfg.data.eval_every) and (step % cfg.data.eval_every == 0 or step == cfg.max_steps)
            # Read points: logging, eval, a checkpoint due (or waiting for this step to vouch for
            # it). A stop signal or a bad loss is acted on at the next one: within log.log_every
            # steps, and before any checkpoint of the weights after it is written or published.
            if not (logging or evaluating or run.checkpoints.pending
                    or run.checkpoints.due(step, cfg.max_steps, stopping=False)):
                continue
            last = settle(run, unread)
            stopped_by = last.stop
            # This step's loss vouches for the weights the previous step saved: publish them.
            run.checkpoints.confirm()
            if logging:
                now = time.perf_counter()
                tps = steps_since_log * global_tokens / (now - t_last)
                t_last, steps_since_log = now, 0
                scalars = {"train/loss": last.loss}
                if run.preference:
                    scalars |= preference_scalars("train/", dict(zip(PREFERENCE_STATS, last.stats)))
                scalars |= {"train/lr": run.scheduler.get_last_lr()[0], "train/grad_norm": last.grad_norm,
                            "perf/tokens_per_s": tps, "perf/tokens_per_s_per_device": tps / env.world_size}
                if peak:
                    scalars["perf/mfu"] = tps / env.world_size * model_flops_per_token / peak
                mem = peak_memory_gib(env.device)
                if mem is not None:
                    scalars["perf/peak_memory_gib"] = mem
                logger.log(step, cfg.max_steps, scalars)
            if evaluating:
                result = evaluate(run, run.eval_batches)  # collective: every rank
                run.eval_losses.append([step, result["loss"]])
                scalars = {"eval/loss": result["loss"]}
                if run.preference:
                    scalars |= preference_scalars("eval/", result)
                    run.eval_metrics.append([step, {k.removeprefix("eval/"): v for k, v in scalars.items()}])
                logger.log(step, cfg.max_steps, scalars)
            if run.checkpoints.due(step, cfg.max_steps, stopping=bool(stopped_by)):
                run.checkpoints.save(step, run.losses)
            if stopped_by:
                break
        if run.checkpoints.pending:  # no step follows the last save: a forward on the next batch vouches
            reason = divergence(probe_loss(run), None, run.losses, divergence_factor(run))
            if reason:
                raise DivergenceError(f"training diverged at step {len(run.losses)}: on the next batch {reason}")
            run.checkpoints.confirm()
        run.checkpoints.finish_pending()
    except DivergenceError as err:
        # every rank saw the same all-reduced loss and raises here together
        unpublished = run.checkpoints.discard_pending()
        good = run.checkpoints.newest_good()
        raise DivergenceError(f"{err}; " + (f"the checkpoint {unpublished.name} was not published; " if unpublished
                                             else "")
                              + f"the newest good checkpoint is {good or 'none (a rerun starts afresh)'}: lower "
                              "optim.lr or check the data, then run again (checkpoint.resume=auto continues from the "
                              "newest good checkpoint)") from None
    finally:
        logger.close()
    return stopped_by, tokens_seen


def finish(run: Run, stopped_by: int, tokens_seen: int) -> dict:
    """What ends a run, in this order: rank 0 writes the adapter and the resolved config; every
    rank writes its share of merged/ (unless stopped); rank 0 writes ``summary.json`` last, so its
    presence means everything before it is on disk."""
    cfg, env, run_dir = run.cfg, run.env, run.run_dir
    losses = run.losses
    counts = count_parameters(run.model)
    summary = {"initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "losses": losses, "steps": len(losses), "completed": not stopped_by,
               "stopped_by_signal": signal.Signals(stopped_by).name if stopped_by else None,
               "trainable_params": counts["trainable"], "total_params": counts["total"],
               "world_size": env.world_size, "tokens_seen_this_run": tokens_seen, "adapter": cfg.adapter.kind,
               "objective": cfg.objective.kind, "eval_losses": run.eval_losses}
    if run.preference:
        summary["eval_metrics"] = run.eval_metrics
    full = cfg.adapter.kind == FULL
    # A quantized run's merged export is the model it trained: its update folded into the base as
    # the run stored it (docs/HF.md, "A quantized base").
    as_trained = TrainedBase.of_run(to_dict(cfg)["model"])
    if env.is_main:
        if not full:  # a full fine-tuning run's weights are its checkpoints (and merged/)
            save_adapter(run.model, run_dir.adapter, {**adapter_meta(to_dict(cfg)["adapter"], str(run.base_dir),
                                                                     run.fingerprint), "step": len(losses)})
        run_dir.write_json(run_dir.config, to_dict(cfg))
    dist.barrier()
    if cfg.export_merged and not stopped_by:
        # The servable result in the base's own file layout: the base with the adapter folded in,
        # or the fully trained weights read back from the final checkpoint. Each rank writes a
        # share of the weight files, one tensor (adapter) or one file (full) in memory at a time.
        # Written into a staging directory and renamed into place once every rank's files are
        # there: merged/ is the whole previous export or the whole new one, never a mix.
        if env.is_main:
            begin_staged(run_dir.merged)
        dist.barrier()
        staging = staging_dir(run_dir.merged)
        if full:
            write_full(run_dir.checkpoints / step_name(cfg.max_steps), run.base_dir, staging,
                       progress=env.is_main, rank=env.rank, world_size=env.world_size)
        else:
            write_merged(run_dir.adapter, run.base_dir, staging, progress=env.is_main,
                         rank=env.rank, world_size=env.world_size, as_trained=as_trained)
            summary["merged_into"] = ORIGINAL_WEIGHTS if as_trained is None else as_trained.describe()
        dist.barrier()
        if env.is_main:
            verify_hf_export(staging, run.base_dir)
            publish_staged(run_dir.merged)
        dist.barrier()
    if env.is_main:  # written last: its presence means everything above is on disk
        run_dir.write_json(run_dir.summary, summary)
    dist.barrier()
    return summary
