"""A step waits on the ranks only where it must (train/step.py): beyond the gradients' reduction,
one all-reduce of the trained-token (or pair) count before the forward and one of [loss sum, a dpo
run's reward sums, stop flags] after the update; no host read of a device tensor except at read points (logging, checkpoints).

The counts of a 2-process run, step by step (tests/train/step_counts_worker.py), on the tiny model
with log.log_every=4: steps 2, 3, 5, 6, 7 do not log, step 4 does."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import FAST, REPO, run_job

pytestmark = pytest.mark.slow  # a torchrun job

# Host reads that do not wait on a device: the collated CPU labels counted (train.step.loss_units)
# and AdamW's step counters, which torch keeps on the CPU.
CPU_SIDE = {"step.py:<genexpr>:__int__", "preference.py:trained_pairs:__int__", "optimizer.py:_get_value:item"}
READ_POINT = "step.py:read:tolist"


@pytest.mark.parametrize("objective,after", [("sft", 3), ("dpo", 8)])  # dpo: 5 reward sums more
def test_a_step_makes_two_small_collectives_and_reads_the_device_only_when_it_logs(tmp_path, objective, after):
    out = tmp_path / "run"
    run_job(2, [*FAST, "log.log_every=4", "data.eval_every=0", "checkpoint.every_steps=0", "export_merged=false",
                f"objective.kind={objective}", f"output_dir={out}"],
            script=REPO / "tests" / "train" / "step_counts_worker.py")
    steps = {s["step"]: s for s in json.loads((out / "step_counts.json").read_text())}
    grads = steps[2]["all_reduces"][1]  # the replicated cores' gradients, one flat tensor
    for n in (2, 3, 4, 5, 6, 7):
        assert steps[n]["all_reduces"] == [1, grads, after], n  # count before, gradients, [loss, stop flags] after
    for n in (2, 3, 5, 6, 7):
        reads = Counter(steps[n]["host_reads"])
        assert set(reads) <= CPU_SIDE, (n, reads)
    logging = Counter(steps[4]["host_reads"])
    assert logging[READ_POINT] == 1 and set(logging) - {READ_POINT} <= CPU_SIDE, logging
    print(f"{objective}, per step: all-reduces of {[1, grads, after]} elements; device reads: 0 without logging, "
          f"{logging[READ_POINT]} when logging")
