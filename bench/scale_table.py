"""The planner's table for docs/SCALE.md: Llama-3.1-8B, Llama-3.3-70B and Llama-3.1-405B on 8, 64
and 512 H100-80GB (8 per node), PMSS at LoRA-r8's budget, LoRA r8 and full fine-tuning side by side.

Each cell is one `pmss-plan` run (its JSON kept in --out, reused when present, so the script can be
stopped and resumed). The configs are the shipped ones (seq 1024, their micro-batch); the global
batch is the config's 64 sequences or one micro-batch per GPU, whichever is larger.

    python bench/scale_table.py --out docs/results/scale        # ~25 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = {"Llama-3.1-8B": "llama3_1_8b.yaml", "Llama-3.3-70B": "llama3_3_70b.yaml",
          "Llama-3.1-405B": "llama3_1_405b.yaml"}
GPUS = (8, 64, 512)
GPUS_PER_NODE = 8
METHODS = {"PMSS": [], "LoRA r8": ["adapter.kind=lora", "adapter.rank=8", "adapter.alpha=16"],
           "full": ["adapter.kind=full"]}


def plan_file(out: Path, model: str, gpus: int, method: str) -> Path:
    return out / f"{model}_{gpus}_{method.replace(' ', '_')}.json"


def run(out: Path, model: str, gpus: int, method: str) -> dict:
    path = plan_file(out, model, gpus, method)
    if not path.is_file():
        config = REPO / "configs" / MODELS[model]
        micro = yaml.safe_load(config.read_text())["data"]["micro_batch_size"]
        batch = max(64, gpus * micro)
        cmd = [sys.executable, "-m", "pmss_dist.cli.plan", "--config", str(config), "--nodes", str(gpus // GPUS_PER_NODE),
               "--gpus-per-node", str(GPUS_PER_NODE), f"data.batch_size={batch}", *METHODS[method], "--quiet",
               "--json", str(path)]
        started = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        print(f"{model} {gpus} GPUs {method}: {time.time() - started:.0f} s", flush=True)
    return json.loads(path.read_text())


def cell(plan: dict) -> list[str]:
    r = plan["recommended"]
    if r is None:
        smallest = min(plan["rows"], key=lambda row: row["peak_bytes"])
        return [f"does not fit (>= {smallest['peak_bytes'] / 2**30:.0f})", "-", "-", "-"]
    s = r["setting"]
    setting = f"dp_shard={s['dp_shard']}"
    if s["reshard_after_forward"] is not None:
        setting += ", " + ("reshard" if s["reshard_after_forward"] else "keep")
    setting += f", AC {s['activation_checkpointing']}"
    inter = r["wire_bytes"].get("inter", 0.0)
    return [f"{r['peak_bytes'] / 2**30:.1f}", f"{inter / 1e9:.3g}", f"{r['time']['tokens_per_s']:,.0f}", setting]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "scale")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for gpus in GPUS:
            for method in METHODS:
                plan = run(args.out, model, gpus, method)
                rows.append([model, gpus, method, *cell(plan)])
    print("| model | GPUs | method | peak GiB per GPU | inter-node GB per GPU per step | tokens/s | set |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
