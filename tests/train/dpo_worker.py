"""One dpo step of the trainer on its first global batch, with a brute-force reference beside it.

    python tests/train/dpo_worker.py --config CONFIG OUT_DIR [overrides ...]

Sets up a run like launch/train.py (world of one), gives every trainable tensor a seeded random
value (so the loss is not ln 2 and every gradient is non-zero), then runs `train.step.micro_steps`
on the first global batch. Beside it, the brute force: the reference log-probs from a second model
built from the base's files with no adapter at all (not the trainer's adapters switched off), the
policy's from the run's model, the DPO formula written out here, and autograd for the gradients.
OUT_DIR gets ``step.safetensors`` (``tokens`` and ``labels``: the batch's chosen rows, then its
rejected rows; ``sums``, ``targets``, ``grad.<name>``
and ``brute.grad.<name>``, ``brute.sums``), ``adapter/`` (the random adapter) and
``grads_adapter/`` (an adapter file holding the gradients, for the PEFT export of them).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pmss_dist.adapters.io import adapter_meta, save_adapter
from pmss_dist.adapters.layers import plain_name
from pmss_dist.build import build_model
from pmss_dist.config import load_config, to_dict
from pmss_dist.parallel.env import init_distributed, shutdown
from pmss_dist.train import step as step_lib
from pmss_dist.train.trainer import rank_batches, release_output_dir, setup


def brute_force(run, batches: list[dict], targets: float) -> tuple[torch.Tensor, dict]:
    pref, cfg = run.preference, run.cfg
    base = build_model(run.model_spec, adapter=None, mesh=None, device=torch.device("cpu"),
                       dtype=getattr(torch, cfg.model.dtype), weights=run.base_dir, max_seq_len=cfg.data.seq_len)
    params = dict(run.model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    sums = torch.zeros(6, dtype=torch.float64)
    grads = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for batch in batches:
        tokens, labels = batch["tokens"], batch["labels"]
        mask = labels != -100

        def logps(logits):
            per_token = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            return (per_token * mask).sum(-1)

        with torch.no_grad():
            ref = logps(base(tokens))
        policy = logps(run.model(tokens))
        n, counts = len(tokens) // 2, mask.sum(-1).double()
        chosen, rejected = policy[:n] - ref[:n], policy[n:] - ref[n:]
        if pref.loss == "ipo":
            losses = (chosen / counts[:n] - rejected / counts[n:] - 1 / (2 * pref.beta)) ** 2
        else:
            z = pref.beta * (chosen - rejected)
            losses = -(1 - pref.label_smoothing) * F.logsigmoid(z) - pref.label_smoothing * F.logsigmoid(-z)
        loss = losses.sum()
        for name, g in zip(trainable, torch.autograd.grad(loss / targets, list(trainable.values()))):
            grads[name] += g
        rc, rr = pref.beta * chosen.detach(), pref.beta * rejected.detach()
        sums += torch.stack([loss.detach(), rc.sum(), rr.sum(), (rc > rr).double().sum(),
                             policy[:n].detach().sum(), policy[n:].detach().sum()])
    return sums, grads


def main() -> None:
    config, out, *overrides = sys.argv[sys.argv.index("--config") + 1:]
    out = Path(out)
    cfg = load_config(config, overrides)
    env = init_distributed()
    run = setup(cfg, env)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in run.params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batches = rank_batches(run, run.sampler.next_batch())
    targets = step_lib.global_targets(step_lib.loss_units(batches, run.preference), env.device)
    sums = step_lib.micro_steps(run.model, batches, env.device, targets, run.preference)
    grads = {plain_name(n): p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}
    for p in run.params:
        p.grad = None
    brute_sums, brute_grads = brute_force(run, batches, float(targets))
    def pairs_first(key: str) -> torch.Tensor:  # every chosen row, then every rejected row
        halves = [b[key].chunk(2) for b in batches]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    tensors = {"tokens": pairs_first("tokens"), "labels": pairs_first("labels"), "sums": sums, "targets": targets.reshape(1), "brute.sums": brute_sums}
    tensors |= {f"grad.{n}": g for n, g in grads.items()}
    tensors |= {f"brute.grad.{plain_name(n)}": g for n, g in brute_grads.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "step.safetensors"))
    meta = {**adapter_meta(to_dict(cfg)["adapter"], str(run.base_dir), run.fingerprint), "step": 0}
    save_adapter(run.model, out / "adapter", meta)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(grads[plain_name(name)])
    save_adapter(run.model, out / "grads_adapter", meta)
    release_output_dir(cfg, env)
    shutdown()


if __name__ == "__main__":
    main()
