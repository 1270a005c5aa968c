"""Shared pieces of the training benchmarks: the models and data every trainer gets, launching a
worker under torchrun, and reading back its step times and peak memory.

Every trainer sees the same thing: an HF Llama checkpoint written by
``pmss_dist.builtin.write_tiny_checkpoint``, a SentencePiece ``tokenizer.model`` trained on the
benchmark's own text, and an Alpaca-style JSON file whose every row is longer than ``seq_len``
tokens. Each trainer cuts rows to ``seq_len``, so every step processes exactly
``batch x seq_len`` tokens with no padding, whichever trainer runs it.

Step times come from a global optimizer post-step hook installed in every worker
(`record_worker`): the same mechanism for every trainer, on every rank, stamping the wall-clock
and process CPU time after each optimizer step. tokens/s = batch x seq_len / median step time over
the measured steps; tokens per CPU-second uses the CPU time of a step summed over ranks, which other
jobs on a shared machine do not inflate the way they inflate wall time. Time to first step is from
launching the command to the end of step 1 (imports, model build, weight loading, skeleton
selection and compilation included). Peak memory is each rank's peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), taken in the worker when it exits: process memory, file
pages of memory-mapped checkpoint reads included. Frozen bytes are each rank's bytes of frozen
parameters, read off the live model after step 1 (`frozen_parameter_bytes`): its local shards, a
quantized tensor counted by what it stores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

# Llama-shaped models written with write_tiny_checkpoint(dir, seed, **overrides).
MODELS = {
    # The built-in model: 4 layers, dim 128, GQA 4/2 heads, vocab 320 (~0.9M parameters).
    "tiny": {},
    # ~100M class: dim 768, 12 layers, 12 heads (MHA), MLP 2048, Llama-2's 32000 vocabulary:
    # 85M in the blocks + 49M in embeddings and output = 134M parameters.
    "100m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
# The seven projections every PEFT baseline adapts (HF names), as our runs adapt all seven.
HF_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Shapes of one step per model: (seq_len, global batch in sequences).
SHAPES = {"tiny": (64, 16), "100m": (128, 4)}
SPM_VOCAB = 256  # < every model's vocab_size, so token ids fit either model


@dataclass
class RunResult:
    name: str
    step_times: list[float]  # wall seconds of steps 2, 3, ... (rank 0)
    first_step_s: float  # launch to the end of step 1
    rss_mib: list[float]  # peak RSS per rank
    rss_after_import_mib: list[float]  # RSS per rank once the framework is imported
    tokens_per_step: int
    step_cpu_s: list[float]  # CPU seconds of steps 2, 3, ..., summed over ranks
    extra: dict = field(default_factory=dict)
    step_collectives: list[list] = field(default_factory=list)  # rank 0's collectives in steps 2, 3, ...
    frozen_bytes: list[int | None] = field(default_factory=list)  # frozen parameter bytes per rank

    def collective_bytes(self, kind: str | None = None, gpus_per_node: int | None = None, crossing: bool | None = None,
                         skip: int = 0) -> float:
        """Median over the measured steps of rank 0's collective payload bytes per step, of ``kind``
        (None: all), and with ``gpus_per_node`` those whose group does (``crossing``) or does not
        span more than one node of that many ranks."""
        def selected(call) -> bool:
            k, _, ranks = call
            spans = gpus_per_node is not None and len({r // gpus_per_node for r in ranks}) > 1
            return (kind is None or k == kind) and (crossing is None or spans == crossing)

        per_step = [sum(c[1] for c in calls if selected(c)) for calls in self.step_collectives]
        return statistics.median(per_step[skip:] or per_step) if per_step else 0.0

    def tokens_per_s(self, skip: int) -> float:
        """Median wall-clock throughput, leaving out the first ``skip`` measured steps."""
        return self.tokens_per_step / statistics.median(self.step_times[skip:] or self.step_times)

    def tokens_per_cpu_s(self, skip: int) -> float:
        """Tokens per CPU-second (all ranks): the contention-robust throughput."""
        return self.tokens_per_step / statistics.median(self.step_cpu_s[skip:] or self.step_cpu_s)


@contextmanager
def workdir(keep: str | None, prefix: str):
    """``keep`` if given, else a temporary directory removed afterwards: a 100M run leaves GBs of
    checkpoints and exports behind."""
    work = Path(keep or tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def model_config(name: str) -> dict:
    from pmss_dist.models.builtin import TINY_CONFIG

    return {**TINY_CONFIG, **MODELS[name]}


def parameter_count(name: str) -> int:
    c = model_config(name)
    d, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return layers * block + 2 * v * d + d


def lora_trainable(config: dict | str, rank: int) -> int:
    """LoRA parameters on all seven projections of every block (``config``: an HF config dict
    or a name in MODELS)."""
    c = model_config(config) if isinstance(config, str) else config
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    per_block = rank * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    return c["num_hidden_layers"] * per_block


def pmss_rank_for_budget(config: dict | str, lora_rank: int) -> int:
    """The k whose 7·L·k² trainable parameters come closest to LoRA-r's."""
    c = model_config(config) if isinstance(config, str) else config
    target = lora_trainable(c, lora_rank)
    return min(range(1, 4096), key=lambda k: abs(7 * c["num_hidden_layers"] * k * k - target))


def _sum_rows(n: int, seed: int) -> list[dict]:
    """Alpaca-style rows whose output is a long run of additions: every row is far longer than
    any benchmark seq_len in either tokenizer, so trainers cut rows to exactly seq_len tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        facts = []
        for _ in range(80):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            facts.append(f"{a} plus {b} is {a + b}.")
        rows.append({"instruction": "Add the numbers in each sentence.", "input": "", "output": " ".join(facts)})
    return rows


def prepare_workspace(root: Path, model: str, num_rows: int = 1024) -> dict[str, Path]:
    """Write (once) the checkpoint, tokenizer and data for ``model`` under ``root``."""
    import sentencepiece as spm

    from pmss_dist.models.builtin import BYTE_TOKENIZER_FILE, write_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    data = root / "sums.json"
    if not data.is_file():
        data.write_text(json.dumps(_sum_rows(num_rows, seed=0)))
    spm_model = root / "spm" / "tokenizer.model"
    if not spm_model.is_file():
        spm_model.parent.mkdir(exist_ok=True)
        text = root / "spm" / "train.txt"
        # The prompt templates' words too, so no trainer's template falls back to <unk>.
        templates = ["Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.", "### Instruction:", "### Input:", "### Response:"]
        text.write_text("\n".join(templates + [r["output"] for r in json.loads(data.read_text())[:200]]))
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(spm_model.with_suffix("")),
                                       vocab_size=SPM_VOCAB, model_type="bpe", character_coverage=1.0,
                                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
                                       minloglevel=2)
    ckpt = root / f"model_{model}"
    if not (ckpt / "config.json").is_file():
        write_tiny_checkpoint(ckpt, seed=0, **MODELS[model])
        (ckpt / BYTE_TOKENIZER_FILE).unlink()  # every trainer reads the same SentencePiece model
        shutil.copy(spm_model, ckpt / "tokenizer.model")
    return {"ckpt": ckpt, "data": data, "tokenizer": ckpt / "tokenizer.model"}


def add_run_arguments(parser, steps: int) -> None:
    """The options of an interleaved comparison on N processes (bench_quant.py, bench_commits.py)."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run; steps 2.. are measured")
    parser.add_argument("--skip", type=int, default=0, help="measured steps left out as warm-up")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep inputs, runs and logs here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=900)


def torchrun(nproc: int, script: Path, args: list[str], env: dict, log: Path, timeout: float,
             tree: Path = REPO) -> float:
    """Run ``script`` on ``nproc`` local processes; return the launch time (time.time())."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    return run_command(cmd, env, log, timeout, tree)


def run_command(cmd: list[str], env: dict, log: Path, timeout: float, tree: Path = REPO) -> float:
    """Run ``cmd`` in the source ``tree`` (this checkout, or another commit's, bench_commits.py),
    its ``bench/`` and ``src/`` first on the path."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tree / "bench"), str(tree / "src"), env.get("PYTHONPATH", "")) if p)
    launched = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=tree, env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}; log {log}:\n{tail}")
    return launched


@dataclass
class WorkerRecord:
    rank: int
    peak_mib: float
    after_import_mib: float
    # (wall time, process CPU time, collectives so far) at the end of each optimizer step
    steps: list[tuple[float, float, int]]
    collectives: list = field(default_factory=list)  # [kind, payload bytes, group ranks] per call, in order
    frozen_bytes: int | None = None  # this rank's frozen parameter bytes after step 1

    def step_collectives(self, step: int) -> list:
        """The collectives this rank called from the end of optimizer step ``step`` - 1 to the end of ``step``
        (1-based; step 1 starts at the worker's start)."""
        first = self.steps[step - 2][2] if step > 1 else 0
        return self.collectives[first:self.steps[step - 1][2]]


# Public torch.distributed collectives -> (kind, the argument holding the payload). The payload is
# the collective's whole tensor: an all-gather's output, a reduce-scatter's input.
COLLECTIVES = {
    "all_gather_single": ("all_gather", "output_tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "all_gather": ("all_gather", "tensor_list"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "all_reduce": ("all_reduce", "tensor"),
    "broadcast": ("broadcast", "tensor"),
}


class CollectiveCounter:
    """Records every collective this process calls as ``[kind, payload bytes, group ranks]``.

    The public torch.distributed functions above are wrapped in this worker process only: FSDP2
    (ours and torchtune's) and the trainers' own all-reduces call them. DDP all-reduces its gradient
    buckets from its C++ reducer instead, unless a comm hook takes over (`ddp_comm_hook`, DDP's
    public API). Nested calls (a deprecated name calling its successor) count once."""

    def __init__(self):
        self.calls: list[list] = []
        self._depth = 0

    def install(self) -> "CollectiveCounter":
        import torch.distributed as dist

        for name, (kind, argument) in COLLECTIVES.items():
            setattr(dist, name, self._wrap(getattr(dist, name), kind, argument))
        return self

    def _wrap(self, fn, kind: str, argument: str):
        import functools
        import inspect

        import torch.distributed as dist

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                bound = signature.bind(*args, **kwargs).arguments
                payload = bound[argument]
                tensors = payload if isinstance(payload, (list, tuple)) else [payload]
                group = bound.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                self.calls.append([kind, sum(t.numel() * t.element_size() for t in tensors), ranks])
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def ddp_comm_hook(self):
        """DDP's own default all-reduce as an explicit comm hook: it then all-reduces each gradient
        bucket through torch.distributed.all_reduce, where the wrapper counts it."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook


COUNTER = CollectiveCounter()  # the worker's counter: `record_worker` installs it


def read_records(record_dir: Path) -> list[WorkerRecord]:
    """Every rank's record, written by `record_worker` when the worker exits."""
    files = sorted(record_dir.glob("rank*.json"), key=lambda p: int(p.stem.removeprefix("rank")))
    if not files:
        raise RuntimeError(f"no rank*.json in {record_dir}: the worker did not reach its exit hook")
    return [WorkerRecord(**json.loads(p.read_text())) for p in files]


def frozen_parameter_bytes(model) -> int:
    """This rank's bytes of ``model``'s frozen parameters (with FSDP2 between steps: its shards)."""
    from torch.distributed.tensor import DTensor

    from pmss_dist.adapters.quantize import tensor_bytes  # a quantized tensor by what it stores

    return sum(tensor_bytes(p.to_local() if isinstance(p, DTensor) else p)
               for p in model.parameters() if not p.requires_grad)


def peer_worker_arguments(data_flag: str, data_help: str, batch_help: str):
    """The command line the HF baselines' workers share (peft_worker.py, trl_worker.py): the
    model, their data (``data_flag``), LoRA rank, steps, global batch and lr."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument(data_flag, required=True, help=data_help)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help=batch_help)
    parser.add_argument("--lr", type=float, default=3e-4)
    return parser


def record_worker(record_dir: str):
    """Called first thing in a worker (after its framework is imported). Stamps the wall and CPU
    time and the count of collectives (`COUNTER`) after every optimizer step (a global post-step
    hook: the same for every trainer, on every rank), and at exit writes them with this rank's
    collectives and peak RSS (ru_maxrss, KiB on Linux). With ``BENCH_FROZEN_BYTES=1``, a global
    forward pre-hook also notes every module called until step 1 ends; after step 1 (FSDP2 has
    resharded) the largest of them, the model, gives the rank's frozen parameter bytes, and the
    hook is removed. (Opt-in: a global hook would change what torch.compile traces in step 1.)
    Returns the writer, for a worker that leaves without the interpreter's exit (`os._exit`)."""
    import atexit
    import resource

    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = int(os.environ.get("RANK", "0"))
    steps: list[tuple[float, float, int]] = []
    called: dict[int, object] = {}
    frozen: list[int] = []
    COUNTER.install()

    def note(module, args) -> None:
        called.setdefault(id(module), module)

    hook = register_module_forward_pre_hook(note) if os.environ.get("BENCH_FROZEN_BYTES") == "1" else None

    def after_step(opt, args, kwargs):
        steps.append((time.time(), time.process_time(), len(COUNTER.calls)))
        if hook is not None and len(steps) == 1:
            hook.remove()
            model = max(called.values(), key=lambda m: sum(1 for _ in m.parameters()), default=None)
            if model is not None:
                frozen.append(frozen_parameter_bytes(model))
            called.clear()

    register_optimizer_step_post_hook(after_step)

    def write():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "peak_mib": peak, "after_import_mib": after_import, "steps": steps,
             "collectives": COUNTER.calls, "frozen_bytes": frozen[0] if frozen else None}))

    atexit.register(write)
    return write


def result_from_records(name: str, records: list[WorkerRecord], launched: float, tokens_per_step: int,
                        **extra) -> "RunResult":
    main = records[0]
    if len(main.steps) < 2:
        raise RuntimeError(f"{name}: only {len(main.steps)} optimizer steps recorded")
    wall = [b[0] - a[0] for a, b in zip(main.steps, main.steps[1:])]
    # CPU seconds of a step summed over ranks: the work done, which other jobs on the machine
    # do not inflate the way they inflate wall time.
    cpu = [sum(r.steps[i + 1][1] - r.steps[i][1] for r in records) for i in range(len(main.steps) - 1)]
    collectives = [main.step_collectives(step) for step in range(2, len(main.steps) + 1)] if main.collectives else []
    return RunResult(name, wall, main.steps[0][0] - launched, [r.peak_mib for r in records],
                     [r.after_import_mib for r in records], tokens_per_step, cpu, extra, collectives,
                     [r.frozen_bytes for r in records])


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def print_markdown(headers: list[str], rows: list[list], title: str | None = None) -> None:
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()
