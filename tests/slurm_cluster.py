"""A real, throw-away, one-node Slurm cluster for tests: munged + slurmctld + slurmd as root.

Everything (key, config, state, logs, sockets) lives in one temporary directory; the daemons
run in the foreground as children of the test process and are killed by `stop()`. Clients
find the cluster through `SLURM_CONF` (see `env()`), so a system-wide Slurm, if any, is never
touched. No cgroups are needed: `proctrack/linuxproc` tracks a job's processes by parentage.

    cluster = SlurmCluster.start(Path(tempfile.mkdtemp()))  # SlurmUnavailable / ClusterError
    job = cluster.run(["--ntasks=2", "script.sbatch"], env=os.environ, log_dir=Path("logs"))
    cluster.stop()

Run `python -m tests.slurm_cluster` to start one by hand (Ctrl-C or SIGTERM stops it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
APT_PACKAGES = ("slurm-wlm", "munge")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here, or we are not root: tests skip."""


class ClusterError(RuntimeError):
    """Slurm is installed but the cluster did not come up: a real failure, with the daemons' logs."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _missing() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def ensure_installed(timeout: float = 300) -> None:
    """Install Debian's slurm-wlm and munge when missing and apt works; else SlurmUnavailable."""
    if not _missing():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"{', '.join(_missing())} not installed and not root (apt-get install {' '.join(APT_PACKAGES)})"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(_missing())} not installed and no apt-get")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    log = ""
    for cmd in (install, ["apt-get", "update", "-q"], install):
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"'{' '.join(cmd)}' timed out after {timeout:.0f}s") from None
        log = (run.stdout + run.stderr)[-600:]
        if cmd is install and run.returncode == 0 and not _missing():
            return
    raise SlurmUnavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {log.strip()}")


def _free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on (all held open together, so no duplicates)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_line(slurmd: str) -> str:
    """This host as slurmd sees it: 'NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..'."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if out.returncode != 0 or line is None:
        raise ClusterError(f"slurmd -C failed: {(out.stdout + out.stderr).strip()[-300:]}")
    return line.strip()


@dataclass
class SlurmCluster:
    root: Path
    host: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and jobs: this cluster's SLURM_CONF, no inherited
        SLURM_* job variables (a test run inside a real Slurm job must not leak its own)."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        path = os.pathsep.join([str(self.root / "bin"), env.get("PATH", os.defpath), *SBIN])
        return env | {"SLURM_CONF": str(self.conf), "PATH": path}

    # ---------------------------------------------------------------- life cycle

    @classmethod
    def start(cls, root: Path, timeout: float = 60) -> SlurmCluster:
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root; not root")
        cluster = cls(root=root)
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "munge", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        sacct = root / "bin" / "sacct"
        sacct.write_text(f"#!{sys.executable}\n" + SACCT)
        sacct.chmod(0o755)
        os.chmod(root / "munge", 0o700)
        key, sock = root / "munge" / "munge.key", root / "munge" / "munge.sock"
        if len(str(sock)) > 100:
            raise ClusterError(f"socket path too long for a unix socket: {sock}")
        self._check([_which("mungekey"), "--create", f"--keyfile={key}"], "mungekey")
        os.chmod(key, 0o600)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: sock.exists(), timeout, "munged socket", "munged")

        node = _node_line(_which("slurmd"))
        self.host = re.match(r"NodeName=(\S+)", node).group(1)
        node = re.sub(r"\s*(UpTime|Boards)=\S+", "", node)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host, node=node, root=root, sock=sock, ctld_port=ctld_port, slurmd_port=slurmd_port
            )
        )
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(self._idle, timeout, f"node {self.host} idle in sinfo", "slurmctld", "slurmd")

    def _check(self, cmd: list[str], what: str) -> None:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise ClusterError(f"{what} failed: {(out.stdout + out.stderr).strip()[-300:]}")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        # Own session: a Ctrl-C in the terminal goes to pytest, which then stops the daemons.
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=self.env()
        )
        log.close()

    def _idle(self) -> bool:
        out = subprocess.run(
            [_which("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=30
        )
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait_for(self, ready, timeout: float, what: str, *daemons: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in daemons:
                if self.procs[name].poll() is not None:
                    raise ClusterError(f"{name} exited with {self.procs[name].returncode}:\n{self.logs(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise ClusterError(f"no {what} after {timeout:.0f}s:\n{self.logs(*daemons)}")

    def logs(self, *names: str) -> str:
        names = names or tuple(self.procs)
        parts = []
        for name in names:
            for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                [_which("scancel"), "--full", f"--user={os.getuid()}"], env=self.env(), capture_output=True, timeout=30
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self._kill_leftover_steps()

    def _kill_leftover_steps(self) -> None:
        """slurmstepd processes of this cluster (found by their SLURM_CONF) can outlive slurmd
        when a job did not end in time; kill them and every process below them."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        mine = f"SLURM_CONF={self.conf}\0".encode()
        for pid in subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True).stdout.split():
            try:
                if mine not in Path(f"/proc/{pid}/environ").read_bytes():
                    continue
            except OSError:
                continue
            tree, i = [int(pid)], 0
            while i < len(tree):
                tree += children.get(tree[i], [])
                i += 1
            for p in tree:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---------------------------------------------------------------- jobs

    def squeue(self, job_id: str | None = None) -> list[str]:
        cmd = [_which("squeue"), "-h", "-o", "%i %T"] + (["-j", job_id] if job_id else [])
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` of a job (one record per array task); finished jobs stay visible
        for MinJobAge seconds."""
        out = subprocess.run(
            [_which("scontrol"), "-o", "show", "job", job_id],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]

    def submit(self, args: list[str], *, env: dict[str, str], log_dir: Path) -> str:
        """sbatch; returns the job id. The output goes to log_dir/slurm-<job>[_<task>].out."""
        log_dir.mkdir(parents=True, exist_ok=True)
        array = any(a.startswith(("--array", "-a")) for a in args)
        output = log_dir / ("slurm-%A_%a.out" if array else "slurm-%j.out")
        out = subprocess.run(
            [_which("sbatch"), "--parsable", f"--output={output}", *args],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, *, log_dir: Path, timeout: float) -> Job:
        """Poll until every task of the job has ended (a requeued job has not) and has stayed
        ended for a second; on timeout cancel it. Never waits longer than `timeout`."""
        deadline, ended_since = time.monotonic() + timeout, None
        while True:
            records = self.records(job_id)
            ended = bool(records) and all(r.get("JobState") in FINISHED for r in records)
            now = time.monotonic()
            if ended:
                ended_since = ended_since or now
                if now - ended_since >= 1.0:
                    return Job(job_id, records, log_dir)
            else:
                ended_since = None
            if now > deadline:
                subprocess.run([_which("scancel"), job_id], env=self.env(), capture_output=True, timeout=30)
                return Job(job_id, records, log_dir, f"timed out after {timeout:.0f}s; cancelled")
            time.sleep(0.25)

    def run(self, args: list[str], *, env: dict[str, str], log_dir: Path, timeout: float = 180) -> Job:
        return self.wait(self.submit(args, env=env, log_dir=log_dir), log_dir=log_dir, timeout=timeout)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Job:
    """A job (or job array) as scontrol last saw it, with its output files."""

    job_id: str
    records: list[dict[str, str]]
    log_dir: Path
    problem: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.problem
            and bool(self.records)
            and all(r.get("JobState") == "COMPLETED" and r.get("ExitCode") == "0:0" for r in self.records)
        )

    @property
    def states(self) -> list[tuple[str, str]]:
        return [(r.get("JobState", "?"), r.get("ExitCode", "?")) for r in self.records]

    def files(self) -> list[Path]:
        return sorted(
            [*self.log_dir.glob(f"slurm-{self.job_id}.out"), *self.log_dir.glob(f"slurm-{self.job_id}_*.out")]
        )

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.files())

    def log(self) -> str:
        """For assertion messages: states, then the tail of every output file of the job."""
        parts = [f"job {self.job_id}: {self.states} {self.problem}"]
        for path in self.files():
            parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-5000:]}")
        return "\n".join(parts)


# The smallest configuration that runs batch jobs, srun steps and arrays on this one node.
SLURM_CONF = """\
ClusterName=saetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
KillWait=10
MinJobAge=600
InactiveLimit=0
JobRequeue=0
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

# slurmdbd (accounting) would need a MariaDB server; submitit only asks sacct for job states,
# which scontrol knows for MinJobAge seconds after a job ends. This stand-in answers
# `sacct -o JobID,State,... --parsable2 -j ID ...` from `scontrol show job`.
SACCT = r"""
import re, subprocess, sys
args, fields, ids = sys.argv[1:], ["JobID", "State"], []
for i, a in enumerate(args):
    if a in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(",")
    elif a.startswith("--format="):
        fields = a.split("=", 1)[1].split(",")
    elif a in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(",")
    elif a.startswith("--jobs="):
        ids += a.split("=", 1)[1].split(",")
print("|".join(fields))
names = {"JobID": None, "State": "JobState", "NodeList": "NodeList", "ExitCode": "ExitCode", "JobName": "JobName"}
for job in ids:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    for line in out.splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if not rec:
            continue
        task = rec.get("ArrayTaskId")
        if task is None:
            jid = rec["JobId"]
        elif task.isdigit():
            jid = f"{rec['ArrayJobId']}_{task}"
        else:
            jid = f"{rec['ArrayJobId']}_[{task}]"
        print("|".join(jid if f == "JobID" else rec.get(names.get(f) or f, "") for f in fields))
"""


if __name__ == "__main__":
    import tempfile

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill <pid>` stops it cleanly too
    c = SlurmCluster.start(Path(tempfile.mkdtemp(prefix="sae-slurm-")))
    print(f"export SLURM_CONF={c.conf} PATH={c.root / 'bin'}:$PATH", flush=True)
    print(f"Ctrl-C (or kill {os.getpid()}) stops the cluster.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
