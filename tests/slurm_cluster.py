"""A throwaway one-node SLURM cluster on this machine, for ``tests/test_slurm.py`` or by hand.

It installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (root, apt-get), writes a
one-node ``/etc/slurm/slurm.conf`` (the executor plugin strips ``SLURM_CONF`` inside jobs, so
the default path is the only one every SLURM command sees) with a fake GPU so that ``gpu=1``
rules are accepted, and starts munged, slurmctld and slurmd in the foreground as its own
children. ``stop()`` ends exactly those processes, by PID, and removes the files it wrote. A
munged that was already running is used and left alone; a slurm.conf it did not write, or a
SLURM daemon already listening, makes it refuse rather than touch a real cluster.

By hand (as root)::

    python tests/slurm_cluster.py up --state /tmp/slurm   # install if needed, start, print sinfo
    python tests/slurm_cluster.py down                    # stop the daemons `up` (or a killed test) started
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
CONF_DIR = Path("/etc/slurm")
MARKER = "# Written by indextts-adapt tests/slurm_cluster.py for a throwaway test cluster."
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
PORTS = (6817, 6818)  # slurmctld, slurmd
# slurmctld only runs on the host SlurmctldHost names; the node is this host too.
NODE = socket.gethostname().split(".")[0]
# The PIDs and files of the running test cluster, so `down` can end one a killed test left behind.
RECORD = Path("/run/indextts-slurm-test.json")
PARTITION = "debug"
# What the node claims at least (SlurmdParameters=config_overrides). Requests are checked
# against it but not enforced (no cgroups), so the profile's real numbers (--cpus-per-gpu=5,
# --cpus-per-gpu=8 for training, --mem 16000) are submitted unchanged on a 2-core machine, and
# two 5-CPU extraction jobs fit at once; the test caps --jobs instead.
MIN_NODE_CPUS = 16
MIN_NODE_MEMORY_MB = 65536


class ClusterError(RuntimeError):
    """The test cluster could not be installed, configured or started (the message says why)."""


def tool(name: str) -> str | None:
    """Path of a SLURM/munge executable (daemons live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None)


def missing_tools() -> list[str]:
    return [t for t in TOOLS if tool(t) is None]


def is_root() -> bool:
    return os.geteuid() == 0


def install(log=print) -> None:
    """apt-get install slurm-wlm munge (root only); a no-op when every tool is there."""
    missing = missing_tools()
    if not missing:
        return
    if not is_root():
        raise ClusterError(f"SLURM tools missing ({', '.join(missing)}) and not root: run `sudo apt-get install {' '.join(PACKAGES)}`")
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    still = missing_tools()
    if still:
        raise ClusterError(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(still)}")


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _munge_works() -> bool:
    if tool("munge") is None or not MUNGE_SOCKET.exists():
        return False
    cred = subprocess.run([tool("munge"), "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run([tool("unmunge")], input=cred.stdout, capture_output=True).returncode == 0


def node_hardware() -> dict[str, str]:
    """This machine as slurmd sees it (``slurmd -C``): CPUs, sockets, cores, threads, memory."""
    out = subprocess.run([tool("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    fields = dict(kv.split("=", 1) for kv in first.split() if "=" in kv)
    fields.pop("NodeName", None)
    return fields


def slurm_conf(state: Path, hw: dict[str, str]) -> str:
    cpus = max(int(hw.get("CPUs", 1)), MIN_NODE_CPUS)
    memory = max(int(hw.get("RealMemory", 0)), MIN_NODE_MEMORY_MB)
    node_fields = f"CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory}"
    return f"""{MARKER}
ClusterName=indextts-test
SlurmctldHost={NODE}(127.0.0.1)
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldPort={PORTS[0]}
SlurmdPort={PORTS[1]}
# No cgroups in a container: track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# CPUs (hardware threads) are the consumable; memory is declared, not enforced.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
# Finished jobs stay visible to squeue and scontrol for an hour: the executor's status checks
# need at least 3x its first check interval, the test reads every job's record after the runs.
MinJobAge=3600
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 {node_fields} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


GRES_CONF = f"""{MARKER}
# A fake GPU: SLURM counts and hands it out; nothing uses the device file.
NodeName={NODE} Name=gpu Count=1 File=/dev/null
"""


@dataclass
class LocalSlurm:
    """The one-node cluster. ``start()`` / ``stop()``, or use it as a context manager."""

    state: Path
    log: object = print
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        if not is_root():
            raise ClusterError("starting slurmd needs root")
        if missing_tools():
            raise ClusterError(f"missing SLURM tools: {', '.join(missing_tools())} (install {' '.join(PACKAGES)})")
        conf = CONF_DIR / "slurm.conf"
        if conf.exists() and MARKER not in conf.read_text(errors="replace"):
            raise ClusterError(f"{conf} exists and was not written by this script: refusing to replace a real cluster's config")
        busy = [p for p in PORTS if _port_in_use(p)]
        if busy:
            hint = ""
            if RECORD.exists():
                rec = json.loads(RECORD.read_text())
                hint = (f" (the test cluster of {rec.get('state')}, pids {rec.get('pids')}: a test still running, or one that "
                        f"was killed; if none is running, stop it with: python {__file__} down)")
            raise ClusterError(f"something already listens on SLURM port(s) {busy}: a SLURM is running here, not starting another{hint}")
        self.state = self.state.resolve()
        for sub in ("slurmctld", "slurmd"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            CONF_DIR.mkdir(parents=True, exist_ok=True)
            self._write(conf, slurm_conf(self.state, node_hardware()))
            self._write(CONF_DIR / "gres.conf", GRES_CONF)
            self._spawn("slurmctld", [tool("slurmctld"), "-D"])
            self._spawn("slurmd", [tool("slurmd"), "-D", "-N", NODE])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self._save_pids()

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self.written.append(path)

    def _start_munge(self) -> None:
        if _munge_works():
            self.log("munged is already running: using it (and leaving it running)")
            return
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run([tool("mungekey"), "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        self._spawn("munged", [tool("munged"), "--foreground"], user="munge", group="munge")
        deadline = time.monotonic() + 20
        while not _munge_works():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError("munged started but `munge -n | unmunge` does not work")
            time.sleep(0.2)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        out = open(self.state / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.log(f"started {name} (pid {self.procs[name].pid})")

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited with {p.returncode}:\n{self.daemon_log(name)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            proc = subprocess.run([tool("sinfo"), "-h", "-N", "-n", NODE, "-o", "%T"], capture_output=True, text=True)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise ClusterError(f"node {NODE} did not become idle in {timeout:.0f} s (state {state!r}):\n{self.daemon_log('slurmctld')}\n{self.daemon_log('slurmd')}")

    def daemon_log(self, name: str, chars: int = 3000) -> str:
        parts = []
        for f in (self.state / f"{name}.log", self.state / f"{name}.stdout"):
            if f.exists():
                parts.append(f"--- {f}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def _save_pids(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items()}
        RECORD.write_text(json.dumps({"pids": pids, "written": [str(p) for p in self.written], "state": str(self.state)}))

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """End the daemons this object started (slurmd, slurmctld, then munged), by PID."""
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            self.log(f"stopped {name} (pid {p.pid})")
        _remove_written(self.written)
        self.written = []
        RECORD.unlink(missing_ok=True)


def _remove_written(paths) -> None:
    for path in map(Path, paths):
        if path.exists() and MARKER in path.read_text(errors="replace"):
            path.unlink()


def stop_from_record() -> None:
    """``down``: end the daemons a previous ``up`` (or an interrupted test) recorded in RECORD."""
    if not RECORD.exists():
        print(f"no test cluster recorded in {RECORD}: nothing to stop")
        return
    rec = json.loads(RECORD.read_text())
    for name in ("slurmd", "slurmctld", "munged"):
        pid = rec["pids"].get(name)
        if pid is None:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except FileNotFoundError:
            continue
        if Path(cmdline).name != name:  # the PID was reused by something else: leave it
            continue
        os.kill(pid, 15)
        for _ in range(300):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        print(f"stopped {name} (pid {pid})")
    _remove_written(rec["written"])
    RECORD.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--state", type=Path, default=Path("/tmp/indextts-slurm"), help="folder for the daemons' state and logs (up)")
    args = p.parse_args(argv)
    if args.action == "down":
        stop_from_record()
        return 0
    install()
    cluster = LocalSlurm(args.state)
    cluster.start()
    print(subprocess.run([tool("sinfo")], capture_output=True, text=True).stdout)
    print(f"stop it with: python {sys.argv[0]} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
