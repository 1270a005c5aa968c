"""A private single-node SLURM (munged + slurmctld + slurmd) for testing the launch/slurm scripts.

Everything lives in one temporary directory: munge key and socket, slurm.conf, state, spool,
logs and pid files, with free TCP ports. Nothing under /etc is touched, so a system SLURM or a
second test run on the same machine is not disturbed. Clients (sbatch, squeue, ...) find the
cluster through ``SLURM_CONF``, which jobs inherit, so ``srun`` inside a job finds it too.

The daemons run in the foreground as our children and are stopped by their PIDs.

Two partitions share the node: ``debug`` (default) and ``urgent``, whose jobs preempt debug
jobs by requeueing them (PreemptMode=REQUEUE, GraceTime), as on clusters with preemptible
queues.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
APT_PACKAGES = ("slurm-wlm", "munge")
PREEMPT_GRACE_S = 60
# A requeued job waits cred_expire seconds before it may start again (SLURM's default: 120).
REQUEUE_DELAY_S = 5


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


def _missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _binary(name) is None]


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when missing. Root only: the private cluster's daemons
    run as root (SlurmUser=root) too."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting a private SLURM needs root (apt-get install, daemons running as "
                               "SlurmUser=root); run the tests as root")
    if not _missing_binaries():
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", *APT_PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale or empty package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or _missing_binaries():
        raise SlurmUnavailable(f"`{' '.join(install)}` failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> None:
        try:
            self._start_munge()
            self._write_conf()
            # -c: a cold start, no state from an earlier run in this directory.
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self._check_alive()
                state = self.run(["sinfo", "-h", "-n", self.host, "-o", "%T"], check=False).stdout.split()
                if state and state[0] == "idle":
                    return
                time.sleep(0.5)
            raise SlurmUnavailable(f"node {self.host} not idle after {timeout_s}s (sinfo: {state});\n"
                                   + self.logs())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, wait for its processes to go, then stop the daemons by PID."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--signal=KILL", "--state=RUNNING"], check=False)
            self.run(["scancel", "--state=PENDING"], check=False)
            self.run(["scancel", "--state=RUNNING"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self._leftover_pids():  # slurmstepd or job processes outliving a failed cancel
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftover_pids(self) -> list[int]:
        """Processes whose environment names this cluster's slurm.conf: the daemons pass it to
        slurmstepd and jobs inherit it from sbatch, so only this cluster's processes match."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes() + b"\0":
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
        return pids

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode};\n" + self.logs())

    def logs(self, tail_lines: int = 15) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, parents=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge / "munge.socket"
        # --force: munged refuses a root-owned setup by default; here that is intended.
        self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={self.root / 'munged.log'}", f"--seed-file={munge / 'seed'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not create its socket in 15s;\n" + self.logs())
            time.sleep(0.1)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=pmsstest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_DELAY_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Scheduling passes every second: a requeued job starts as soon as its delay is over.
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={PREEMPT_GRACE_S}
PartitionName=urgent Nodes={self.host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")

    # -- clients --------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, argv: list[str], cwd: Path, env: dict | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *map(str, argv)], cwd=cwd, env={**self.env, **(env or {})})
        return int(out.stdout.strip().split(";")[0])

    def job_fields(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...); {} once purged."""
        result = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if result.returncode != 0:
            return {}
        fields = {}
        for token in result.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for_job(self, job_id: int, timeout_s: float) -> dict[str, str]:
        """Wait until the job is finished for good (not pending, running or being requeued)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s}s: {self.job_fields(job_id)}")
