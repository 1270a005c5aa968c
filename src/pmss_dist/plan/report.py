"""The plan as text (tables, the recommendation, the assumptions) and as JSON."""

from __future__ import annotations

import dataclasses

from pmss_dist.plan.comms import ALL_GATHER, ALL_REDUCE, KINDS, REDUCE_SCATTER
from pmss_dist.plan.planner import Plan, Row

GIB = 2**30


def gib(value: float | None, unit: int = GIB) -> str:
    return "-" if value is None else f"{value / unit:.2f}"


def size(value: float) -> str:
    """Bytes in the largest unit that leaves a number >= 1."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _policy(row: Row) -> str:
    r = row.setting.reshard_after_forward
    return "-" if r is None else ("reshard" if r else "keep")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _comm(row: Row, kind: str) -> str:
    if row.volume is None:
        return "-"
    intra, inter = (row.volume.total("payload", link, kind) for link in ("intra", "inter"))
    if not intra and not inter:
        return "0"
    return f"{size(intra)} / {size(inter)}"


def _speed(row: Row) -> tuple[str, str]:
    if row.time is None:
        return "-", "-"
    return f"{row.time.step_s:.3g}", f"{row.time.tokens_per_s:,.0f}"


def render(plan: Plan) -> str:
    c = plan.cluster
    out = [f"# pmss-plan: {plan.model_name}, {plan.adapter}, {c.nodes} x {c.gpus_per_node} GPUs of {c.gpu_memory_gib:g} GiB",
           "",
           f"model: {plan.model_source}; {plan.total_params:,} parameters ({gib(plan.parameter_bytes)} GiB as built, "
           f"{plan.dtype} base), {plan.trainable_params:,} trained",
           f"batch: global {plan.global_batch} sequences of {plan.seq_len} tokens = {c.world_size} ranks x micro-batch "
           f"{plan.micro_batch} x {plan.grad_accum} accumulation step(s); "
           f"{plan.peft_flops_per_token / 1e9:.3g} GFLOP per token (train.metrics)",
           f"assumptions: peak {c.peak_tflops:g} TFLOP/s per GPU at mfu {c.mfu:g}; links {c.intra_gbps:g} Gb/s within a "
           f"node, {c.inter_gbps:g} Gb/s between nodes, per GPU; fits = peak <= {gib(c.usable_bytes)} GiB "
           f"({c.headroom:.0%} of the GPU kept for CUDA, NCCL and allocator rounding); compile off in the fake step"
           + (f"; fake steps at {plan.sampled_depths[0]} and {plan.sampled_depths[1]} blocks, extrapolated to the "
              "model's depth (--full-depth: at its own)" if plan.sampled_depths else ""),
           f"the config as written resolves to: {plan.config_setting.overrides()}"]
    config_row = plan.row(plan.config_setting)
    if config_row is not None:
        out.append(f"  -> peak {gib(config_row.peak)} GiB, {'fits' if config_row.fits else 'DOES NOT FIT'}"
                   + (f", {_speed(config_row)[1]} tokens/s" if config_row.time else ""))
    out += [f"not planned: dp_shard={s}, {why}" for s, why in plan.unsplittable.items()]
    unit, unit_name = (GIB, "GiB") if max(r.peak for r in plan.rows) >= GIB else (2**20, "MiB")
    out += ["", f"## Memory per rank ({unit_name}) and collectives per step (intra / inter-node payload)", ""]
    headers = ["dp_shard", "reshard", "AC", "frozen shards", "gathered at peak", "cores+grads+AdamW", "activations",
               "logits", "peak", "fits", "all-gather", "reduce-scatter", "all-reduce", "step s", "tokens/s", "from"]
    table, bounded = [], set()
    for r in plan.rows:
        step_s, tps = _speed(r)
        if r.volume is None:  # no step was run: one line per dp_shard and reason, its peak a lower bound
            if (r.setting.dp_shard, r.source) in bounded:
                continue
            bounded.add((r.setting.dp_shard, r.source))
            policy = "keep" if r.source == "gathered model only" else "any"
            table.append([r.setting.dp_shard, policy, "any", gib(r.frozen, unit), gib(r.gathered, unit),
                          gib(r.trained + r.grads + r.optimizer, unit), "-", "-", f">= {gib(r.peak, unit)}", "no",
                          "-", "-", "-", "-", "-", r.source])
            continue
        table.append([r.setting.dp_shard, _policy(r), r.setting.activation_checkpointing, gib(r.frozen, unit),
                      gib(r.gathered, unit), gib(r.trained + r.grads + r.optimizer, unit), gib(r.activations, unit),
                      gib(r.logits, unit), gib(r.peak, unit), "yes" if r.fits else "no", _comm(r, ALL_GATHER),
                      _comm(r, REDUCE_SCATTER), _comm(r, ALL_REDUCE), step_s, tps, r.source])
    out.append(_table(headers, table))
    out += ["", "## Recommendation", "", recommendation(plan), "", f"(planned in {plan.seconds:.0f} s)"]
    return "\n".join(out)


def recommendation(plan: Plan) -> str:
    r = plan.recommended
    if r is None:
        smallest = min(plan.rows, key=lambda row: row.peak)
        return (f"NOTHING FITS on {plan.cluster.world_size} GPUs of {plan.cluster.gpu_memory_gib:g} GiB: the smallest "
                f"peak is {gib(smallest.peak)} GiB ({smallest.setting.overrides()}) against {gib(plan.cluster.usable_bytes)} "
                "GiB usable. Use more GPUs or a smaller data.micro_batch_size or data.seq_len"
                + (", or PMSS/LoRA instead of full fine-tuning." if plan.adapter == "full fine-tuning" else "."))
    inter = r.volume.total("wire", "inter")
    return (f"set {r.setting.overrides()}: peak {gib(r.peak)} GiB of {gib(plan.cluster.usable_bytes)} usable, "
            f"{size(inter)} sent between nodes per GPU per step, predicted {r.time.step_s:.3g} s per step, "
            f"{r.time.tokens_per_s:,.0f} tokens/s ({r.time.tokens_per_s / plan.cluster.world_size:,.0f} per GPU)")


def to_json(plan: Plan) -> dict:
    """The plan as JSON values: every row with its bytes, volumes and times."""

    def row(r: Row) -> dict:
        d = {"setting": dataclasses.asdict(r.setting), "source": r.source, "fits": r.fits, "frozen_bytes": r.frozen,
             "trained_bytes": r.trained, "grad_bytes": r.grads, "optimizer_bytes": r.optimizer,
             "gathered_at_peak_bytes": r.gathered,
             "activation_bytes": r.activations, "logits_bytes": r.logits, "peak_bytes": r.peak,
             "peak_breakdown": r.breakdown}
        if r.volume is not None:
            d["payload_bytes"] = {f"{k}/{link}": r.volume.total("payload", link, k) for k in KINDS
                                  for link in ("intra", "inter") if r.volume.total("payload", link, k)}
            d["wire_bytes"] = {link: r.volume.total("wire", link) for link in ("intra", "inter")}
        if r.time is not None:
            d["time"] = dataclasses.asdict(r.time)
        return d

    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ("rows", "recommended")}
    fields["cluster"] = dataclasses.asdict(plan.cluster)
    fields["config_setting"] = dataclasses.asdict(plan.config_setting)
    return {**fields, "rows": [row(r) for r in plan.rows],
            "recommended": row(plan.recommended) if plan.recommended else None,
            "recommendation": recommendation(plan)}

