"""The GPU machine's tooling, on CPU (docs/GPU.md): the wheel kit and its pins, the device-like
environment (the machine's packages, the kit's wheels, CPU torch) training the tiny model,
``tools/gpu_check.sh --dry-run`` end to end, and ``tools/gpu_experiment.sh``'s split, join and
argument plumbing on a small fake GGUF. None of these needs a GPU; the CUDA run itself happens on
the device."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
KIT_NAMES = {"torchtune", "torchao", "omegaconf", "datasets", "dill", "multiprocess"}
METHODS = ["pmss_deim_k108", "pmss_deim_k152", "lora_r8", "lora_r16", "pmss_qdeim_k108", "pmss_norm_k108",
           "pmss_random_k108"]


def sh(*args, env: dict | None = None, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# The device's time budgets are not what the dry runs check: on a loaded CPU (load average 4) the
# check's budget ran out and its bench skipped groups. Unbounded, every step runs.
NO_TIME_BUDGET = {"GPU_CHECK_BUDGET_S": "86400", "GPU_EXP_BUDGET_S": "86400"}


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# -- the kit -------------------------------------------------------------------------------------


def test_kit_pins_agree_with_pyproject_and_leave_torch_alone():
    kit = dict(line.split("==") for line in sh(TOOLS / "gpu_kit.sh", "list").stdout.split())
    assert set(kit) == KIT_NAMES
    deps = re.findall(r'"(torchtune|torchao)==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert deps and all(kit[name] == version for name, version in deps), (kit, deps)
    device = set(sh(TOOLS / "gpu_kit.sh", "device-packages").stdout.split())
    assert not device & set(kit), "a package the machine has must not travel"
    assert "torch" not in kit and "torch" not in device  # the machine's torch is never replaced


def test_kit_install_refuses_a_damaged_wheel(tmp_path):
    """install checks every wheel against the MANIFEST before touching anything."""
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    wheel = kit / "wheels" / "x-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not the bytes that were fetched")
    (kit / "MANIFEST").write_text(f"{wheel.name} 31 {'0' * 64}\npython_version 3.12\n")
    proc = sh(TOOLS / "gpu_kit.sh", "install", "--kit", kit, "--target", tmp_path / "site",
              env={"PYTHON": sys.executable}, check=False)
    assert proc.returncode != 0 and "does not match" in proc.stderr
    assert not (tmp_path / "site").exists()


# -- gpu_check.sh --dry-run ----------------------------------------------------------------------


def check_dry_run_report(out: Path) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench_gpu.json", "cuda_tests.xml", "env.json", "gpu_check.json", "gpu_check.log",
                     "summary.txt"], files  # the device returns at most 8
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["env"]["pmss_dist_import"] == "ok"

    tests = report["cuda_tests"]
    assert tests["ran"] and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert tests["counts"]["skipped"] == len(tests["cases"]) >= 10  # the layer, training, checkpoint, export tests
    assert all("needs a CUDA device" in c["message"] for c in tests["cases"])
    names = " ".join(c["name"] for c in tests["cases"])
    for expected in ("test_bf16_layer_matches_fp64", "test_bf16_compiled_run_matches_cpu_fp32",
                     "test_checkpoint_resumes_on_the_other_device", "test_merged_export_on_cuda_equals_cpu"):
        assert expected in names

    bench = report["bench"]
    assert bench["complete"] and not bench["skipped"]
    assert finite_positive(bench["peak"]["bf16_flops_measured"])
    rows = {r["method"]: r for r in bench["train"]}
    assert set(rows) == {"pmss", "lora", "frozen"}
    for method, r in rows.items():
        assert "error" not in r, r
        for key in ("tokens_per_s", "step_s_median", "flops_per_token", "peft_mfu_measured_peak", "peak_memory_gib",
                    "first_step_s", "loss_first", "loss_last", "total_params"):
            assert finite_positive(r[key]), (method, key, r[key])
        assert r["planner_prediction_gib"] is None and "no memory planner wired in" in r["planner_note"]
        assert r["compile"] is True
    assert rows["frozen"]["trainable_params"] == 0
    # PMSS at LoRA-r8's budget: trainable parameters within a few percent of LoRA r8's.
    assert abs(rows["pmss"]["trainable_params"] / rows["lora"]["trainable_params"] - 1) < 0.05
    assert rows["pmss"]["ac"] == rows["lora"]["ac"] == "selective"
    layers = bench["layers"]
    assert {r["shape"] for r in layers} == {"256x256", "688x256", "256x688"}
    assert all(finite_positive(r["ms_median"]) and finite_positive(r["x_base"]) for r in layers)
    assert all(r["x_base"] == 1.0 for r in layers if r["variant"] == "base")

    summary = (out / "summary.txt").read_text()
    assert "CUDA tests: 0 passed, 0 failed, 0 errors" in summary
    for method in ("pmss", "lora", "frozen"):
        assert re.search(rf"tiny\s+\S+\s+{method}", summary), summary
    assert len(summary.splitlines()) <= 30  # one screen
    return report


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    proc = sh(TOOLS / "gpu_check.sh", out, "--dry-run", env={"PYTHON": sys.executable, **NO_TIME_BUDGET},
              timeout=3600)
    assert "done, status 0" in proc.stdout
    check_dry_run_report(out)


def test_gpu_check_usage():
    assert sh(TOOLS / "gpu_check.sh", check=False).returncode == 2
    assert sh(TOOLS / "gpu_check.sh", "/tmp/x", "--bogus", check=False).returncode == 2


# -- gpu_experiment.sh ---------------------------------------------------------------------------


@pytest.fixture
def fake_split(tmp_path):
    """A 3 MB stand-in for the GGUF, split into halves of at most 2 MiB, half A stored as call 1
    stores it, then removed from the parts folder as call 2 would not carry it."""
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(3_000_001))
    env = {"GPU_EXP_PARTS": str(tmp_path / "parts"), "GPU_EXP_STASH": str(tmp_path / "stash"),
           "GPU_EXP_WORK": str(tmp_path / "work"), "PYTHON": sys.executable, **NO_TIME_BUDGET}
    sh(TOOLS / "gpu_experiment.sh", "split", "--gguf", fake, "--part-mib", "2", env=env)
    a, b = tmp_path / "parts" / ".gpu_exp_a", tmp_path / "parts" / ".gpu_exp_b"
    assert (a / "part_a").stat().st_size + (b / "part_b").stat().st_size == fake.stat().st_size
    assert max((a / "part_a").stat().st_size, (b / "part_b").stat().st_size) <= 2 * 2**20
    sh(TOOLS / "gpu_experiment.sh", "store", env=env)
    for f in a.iterdir():
        f.unlink()
    a.rmdir()
    return fake, env


def test_experiment_halves_join_to_the_checked_file(fake_split, tmp_path):
    fake, env = fake_split
    joined = tmp_path / "joined.gguf"
    sh(TOOLS / "gpu_experiment.sh", "join", joined, env=env)
    assert joined.read_bytes() == fake.read_bytes()
    # A damaged half is refused, and so is a half from another split.
    stash_a = tmp_path / "stash" / "part_a"
    data = bytearray(stash_a.read_bytes())
    data[1000] ^= 0xFF
    stash_a.write_bytes(bytes(data))
    proc = sh(TOOLS / "gpu_experiment.sh", "join", tmp_path / "again.gguf", env=env, check=False)
    assert proc.returncode != 0 and "does not match its sha256" in proc.stderr
    assert not (tmp_path / "again.gguf").exists()
    proc = sh(TOOLS / "gpu_experiment.sh", "split", "--gguf", fake, "--part-mib", "1", env=env, check=False)
    assert proc.returncode != 0 and "exceed 1 MiB" in proc.stderr


def test_experiment_dry_run_plumbing(fake_split, tmp_path):
    fake, env = fake_split
    out = tmp_path / "out"
    sh(TOOLS / "gpu_experiment.sh", "run", out, "--dry-run", env=env, timeout=600)
    assert (tmp_path / "work" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == fake.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_experiment.log", "workers.log"]
    workers = (out / "workers.log").read_text()
    commands = [line for line in workers.splitlines() if line.startswith("[dry run]")]
    assert len(commands) == len(METHODS) * 3
    for method in METHODS:
        for seed in (0, 1, 2):
            assert any(f"--methods {method} --seeds {seed} --lrs" in c for c in commands), (method, seed)
    assert all("--steps 1000 --test-limit 0" in c and "model.dtype=bfloat16" in c for c in commands)
    log = (out / "gpu_experiment.log").read_text()
    assert "sha256 checked" in log and "--report-only --methods " + " ".join(METHODS) in log
    # An argument the driver does not know stops the run before anything trains.
    proc = sh(TOOLS / "gpu_experiment.sh", "run", tmp_path / "bad", "--dry-run",
              env={**env, "GPU_EXP_METHODS": "not_a_method"}, check=False, timeout=300)
    assert proc.returncode != 0 and "the driver rejects" in proc.stdout + proc.stderr


# -- the device-like environment -----------------------------------------------------------------


@pytest.mark.slow
def test_device_like_environment_trains_and_runs_the_check(tmp_path):
    """A venv with CPU torch, only the GPU machine's packages, and the kit's wheels unpacked on
    PYTHONPATH (built once under .venv-device/, reused while its recipe is unchanged) imports
    pmss_dist, trains the tiny model, and runs gpu_check.sh --dry-run through the kit's install."""
    venv = REPO / ".venv-device"
    sh(TOOLS / "gpu_kit.sh", "device-venv", venv, env={"PYTHON": sys.executable}, timeout=900)
    python = venv / "bin" / "python"
    site = venv / "kit-site"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{site}"}
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, json, torch, torchtune; "
         "print(json.dumps({'torch': torch.__version__, 'torchtune': torchtune.__file__, "
         "'absent': [m for m in ('torchdata', 'kagglehub', 'blobfile', 'gguf') "
         "if u.find_spec(m) is None]}))"], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    assert info["torch"].startswith("2.13")
    assert info["torchtune"].startswith(str(site))  # from the kit, not from an install
    # torchtune declares these, and the GPU machine lacks them: training must not need them.
    assert set(info["absent"]) >= {"torchdata", "kagglehub", "blobfile", "gguf"}

    run = tmp_path / "run"
    subprocess.run([str(python), "launch/train.py", "--config", "configs/tiny.yaml", "max_steps=12",
                    "log.log_every=4", "data.num_samples=256", "data.batch_size=16", "data.micro_batch_size=4",
                    "adapter.rank=8", "adapter.alpha=8.0", "model.dtype=float32", f"output_dir={run}"],
                   cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 12
    assert summary["final_loss"] < summary["initial_loss"] - 0.1
    assert (run / "merged" / "model.safetensors").is_file()

    # The GPU check itself, as the device runs it: torchtune not importable, so the kit installs.
    out = tmp_path / "gpu_check"
    proc = sh(TOOLS / "gpu_check.sh", out, "--dry-run", timeout=3600,
              env={**NO_TIME_BUDGET, "PYTHON": str(python), "GPU_CHECK_KIT": str(venv / "kit"),
                   "GPU_KIT_TARGET": str(tmp_path / "kit-site"), "PYTHONPATH": ""})
    assert "gpu_kit: installed 6 wheels" in proc.stdout
    report = check_dry_run_report(out)
    assert report["env"]["torchtune"].startswith("0.6.1") and report["env"]["torch"].startswith("2.13")
