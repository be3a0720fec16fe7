"""A throw-away SLURM cluster on localhost for tests: private munged, slurmctld, and one slurmd per
simulated node, all under one temp directory, stopped by the PIDs they recorded.

Works as root without systemd or cgroups (Debian's munge, slurmctld, slurmd, slurm-client).
Settings that make tests take seconds: a requeued job may start again after cred_expire + 1 s
(5 s here instead of 120), and the scheduler runs every second.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "mungekey")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _free_port_block(count: int) -> int:
    """A first port such that it and the next count-1 ports are free."""
    for base in range(21000, 40000, 37):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here may reap late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 4, task_plugin: str = "task/none"):
        """task_plugin: task/affinity binds each task to the CPUs it was given, as production
        clusters do (then `cpus` must not exceed this machine's CPUs)."""
        self.root, self.nodes, self.cpus, self.task_plugin = Path(root), nodes, cpus, task_plugin
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._hosts_marker = f"# dist_train test cluster {self.root}"

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        for sub in ("state", "log", "munge", *[f"spool-n{i}" for i in range(1, self.nodes + 1)]):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose parent directories are not world-executable.
        for directory in (self.root, self.root / "munge"):
            directory.chmod(0o755)
        self._add_node_names_to_hosts()
        self._start_munge()
        self._write_conf()
        self._run(["slurmctld", "-f", str(self.conf)])
        _wait_for_file(self.root / "slurmctld.pid")
        for i in range(1, self.nodes + 1):
            self._run(["slurmd", "-f", str(self.conf), "-N", f"n{i}"])
            _wait_for_file(self.root / f"slurmd-n{i}.pid")
        self._wait_idle()
        return self

    def stop(self) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged by their PIDs."""
        if self._pid("slurmctld.pid") and _alive(self._pid("slurmctld.pid")):
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while self.squeue() and time.monotonic() < deadline:
                time.sleep(0.2)
        pidfiles = [f"slurmd-n{i}.pid" for i in range(1, self.nodes + 1)] + ["slurmctld.pid", "munge/munged.pid"]
        for name in pidfiles:
            pid = self._pid(name)
            if pid and _alive(pid):
                os.kill(pid, 15)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, 9)
        self._remove_node_names_from_hosts()

    # -- jobs -----------------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True,
                             text=True, timeout=30)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def squeue(self, job: str | None = None) -> list[str]:
        """Lines 'JOBID STATE' of jobs still known to the queue (array tasks one per line)."""
        cmd = ["squeue", "-h", "-r", "-o", "%i %T"] + (["-j", job] if job else [])
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def scancel(self, *args: str) -> None:
        # Its exit status is not checked: scancel reports an error when a step it signals is just
        # ending, which the tests see in the job output anyway.
        subprocess.run(["scancel", *args], env=self.env, timeout=30, capture_output=True)

    def wait_gone(self, job: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.squeue(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still queued after {timeout}s: {self.squeue(job)}")
            time.sleep(0.5)

    def job_states(self, job: str) -> list[str]:
        """Every state change of job (or array job) `job` recorded by jobcomp/filetxt."""
        text = (self.root / "log" / "jobcomp.txt").read_text() if (self.root / "log" / "jobcomp.txt").exists() else ""
        states = []
        for line in text.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job or fields.get("ArrayJobId") == job:
                states.append(f"{fields.get('ArrayTaskId', '')}:{fields.get('JobState')}")
        return states

    # -- internals ------------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _run(self, cmd: list[str]) -> None:
        subprocess.run(cmd, env=self.env, check=True, stdin=subprocess.DEVNULL, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _start_munge(self) -> None:
        m = self.root / "munge"
        self._run(["mungekey", "--create", f"--keyfile={m}/munge.key"])
        (m / "munge.key").chmod(0o600)
        self._run(["munged", f"--socket={m}/munge.sock", f"--key-file={m}/munge.key",
                   f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        _wait_for_file(m / "munged.pid")

    def _write_conf(self) -> None:
        r, port = self.root, _free_port_block(self.nodes + 1)
        memory = 2000 * self.cpus
        self.conf.write_text(f"""\
ClusterName=dist-train-test
SlurmctldHost=localhost
SlurmctldPort={port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.sock,cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin={self.task_plugin}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=300
KillWait=10
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
NodeName=n[1-{self.nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{port + 1}-{port + self.nodes}] CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and set(out.stdout.split()) == {"idle"}:
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*.log"))
        raise RuntimeError(f"SLURM nodes did not become idle:\n{logs}")

    def _add_node_names_to_hosts(self) -> None:
        # MASTER_ADDR is the first host of SLURM_JOB_NODELIST: the node names must resolve.
        hosts = Path("/etc/hosts")
        lines = [f"127.0.0.1 n{i} {self._hosts_marker}" for i in range(1, self.nodes + 1)
                 if subprocess.run(["getent", "hosts", f"n{i}"], capture_output=True).returncode]
        if lines:
            hosts.write_text(hosts.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")

    def _remove_node_names_from_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        kept = [line for line in hosts.read_text().splitlines() if not line.endswith(self._hosts_marker)]
        hosts.write_text("\n".join(kept) + "\n")
