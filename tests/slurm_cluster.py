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
    python tests/slurm_cluster.py up --nodes 2            # two nodes, each slurmd in its own netns (TwoNodeSlurm)
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


def slurm_conf(state: Path, hw: dict[str, str], ctld_addr: str = "127.0.0.1",
               nodes: tuple[tuple[str, str], ...] | None = None) -> str:
    """slurm.conf for ``nodes`` ((name, address) pairs; default: this host at 127.0.0.1), each
    with ``hw`` and one fake GPU. Several nodes get a spool, PID and log file each (``%n``)."""
    nodes = nodes or ((NODE, "127.0.0.1"),)
    per_node = "-%n" if len(nodes) > 1 else ""
    cpus = max(int(hw.get("CPUs", 1)), MIN_NODE_CPUS)
    memory = max(int(hw.get("RealMemory", 0)), MIN_NODE_MEMORY_MB)
    node_fields = f"CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory}"
    node_lines = "\n".join(f"NodeName={name} NodeAddr={addr} {node_fields} Gres=gpu:1 State=UNKNOWN" for name, addr in nodes)
    return f"""{MARKER}
ClusterName=indextts-test
SlurmctldHost={NODE}({ctld_addr})
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd{per_node}
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd{per_node}.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd{per_node}.log
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
{node_lines}
PartitionName={PARTITION} Nodes={",".join(n for n, _ in nodes)} Default=YES MaxTime=INFINITE State=UP
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
        for sub in self._state_dirs():
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._setup()
            CONF_DIR.mkdir(parents=True, exist_ok=True)
            self._write(conf, self._slurm_conf())
            self._write(CONF_DIR / "gres.conf", self._gres_conf())
            self._spawn("slurmctld", [tool("slurmctld"), "-D"])
            self._spawn_slurmd()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self._save_pids()

    # What the two-node variant (TwoNodeSlurm) replaces.
    def node_names(self) -> list[str]:
        return [NODE]

    def _state_dirs(self) -> tuple[str, ...]:
        return ("slurmctld", "slurmd")

    def _setup(self) -> None:
        """Anything the nodes need before the config is written (nothing for one node)."""

    def _teardown(self) -> None:
        """Undo ``_setup`` (called by ``stop``, before the record is removed)."""

    def _record_extra(self) -> dict:
        return {}

    def _slurm_conf(self) -> str:
        return slurm_conf(self.state, node_hardware())

    def _gres_conf(self) -> str:
        return GRES_CONF

    def _spawn_slurmd(self) -> None:
        self._spawn("slurmd", [tool("slurmd"), "-D", "-N", NODE])

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
        names = self.node_names()
        while time.monotonic() < deadline:
            self._check_alive()
            proc = subprocess.run([tool("sinfo"), "-h", "-N", "-n", ",".join(names), "-o", "%T"], capture_output=True, text=True)
            state = proc.stdout.strip()
            states = state.split()
            if proc.returncode == 0 and len(states) == len(names) and all(s.startswith("idle") for s in states):
                return
            time.sleep(0.5)
        slurmd_logs = "\n".join(self.daemon_log(n) for n in sorted(self.procs) if n.startswith("slurmd"))
        raise ClusterError(f"node(s) {', '.join(names)} did not become idle in {timeout:.0f} s (state {state!r}):\n{self.daemon_log('slurmctld')}\n{slurmd_logs}")

    def daemon_log(self, name: str, chars: int = 3000) -> str:
        parts = []
        for f in (self.state / f"{name.replace('@', '-')}.log", self.state / f"{name}.stdout"):
            if f.exists():
                parts.append(f"--- {f}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def _save_pids(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items()}
        RECORD.write_text(json.dumps({"pids": pids, "written": [str(p) for p in self.written], "state": str(self.state), **self._record_extra()}))

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """End the daemons this object started (slurmd, slurmctld, then munged), by PID."""
        for name in [*sorted(n for n in self.procs if n.startswith("slurmd")), "slurmctld", "munged"]:
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
        self._teardown()
        RECORD.unlink(missing_ok=True)


# -- two nodes ----------------------------------------------------------------------------------
# Each node is a slurmd in a network namespace of its own (a veth on a bridge that slurmctld
# listens on) and a UTS namespace of its own (its hostname), so torchrun's rendezvous sees two
# hosts. Mount namespaces stay shared: munge's socket, the spool and the workflow are the same files.
NET_PREFIX = "10.77.0"
BRIDGE = "ittbr0"
BRIDGE_ADDR = f"{NET_PREFIX}.1"
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# indextts-slurm-test"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return _ip("link", "show", name, check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def teardown_network(net: dict, log=print) -> None:
    """Remove what ``TwoNodeSlurm`` recorded creating: its namespaces (and with them the node
    ends of the veths), the veths, the bridge and its /etc/hosts lines. Missing pieces are skipped."""
    for ns in net.get("netns", []):
        if _netns_exists(ns):
            _ip("netns", "del", ns, check=False)
            log(f"removed network namespace {ns}")
    for link in [*net.get("veths", []), *([net["bridge"]] if net.get("bridge") else [])]:
        if _link_exists(link):
            _ip("link", "del", link, check=False)
            log(f"removed link {link}")
    if net.get("hosts") and HOSTS.exists():
        lines = HOSTS.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not ln.rstrip().endswith(HOSTS_TAG)]
        if len(keep) != len(lines):
            with open(HOSTS, "w") as f:  # in place: /etc/hosts is often a bind mount
                f.writelines(keep)
            log(f"removed {len(lines) - len(keep)} line(s) from {HOSTS}")


@dataclass
class TwoNodeSlurm(LocalSlurm):
    """Two SLURM nodes on this machine (``ittnode1``, ``ittnode2`` at 10.77.0.11/.12), each a
    slurmd in its own network and UTS namespace, under one slurmctld on the bridge (10.77.0.1).
    ``stop()`` also removes the namespaces, veths, bridge and /etc/hosts lines; all of them are
    in RECORD from the moment they exist, so ``down`` cleans up after a killed test too."""

    names: tuple[str, ...] = ("ittnode1", "ittnode2")
    net: dict = field(default_factory=lambda: {"bridge": None, "netns": [], "veths": [], "hosts": False})

    def node_names(self) -> list[str]:
        return list(self.names)

    def addr(self, i: int) -> str:
        return f"{NET_PREFIX}.{11 + i}"

    def _state_dirs(self) -> tuple[str, ...]:
        return ("slurmctld", *(f"slurmd-{n}" for n in self.names))

    def _record_extra(self) -> dict:
        return {"net": self.net}

    def _setup(self) -> None:
        if tool("nsenter") is None or tool("unshare") is None or shutil.which("ip") is None:
            raise ClusterError("two nodes need nsenter, unshare (util-linux) and ip (iproute2)")
        taken = [n for n in (BRIDGE, *(f"ittv{i + 1}" for i in range(len(self.names)))) if _link_exists(n)]
        taken += [n for n in self.names if _netns_exists(n)]
        if taken or (HOSTS.exists() and HOSTS_TAG in HOSTS.read_text()):
            raise ClusterError(f"the two-node network exists already ({', '.join(taken) or HOSTS}): a test still running, "
                               f"or one that was killed; if none is running, remove it with: python {__file__} down")
        self._save_pids()  # from here on, `down` can undo whatever exists
        _ip("link", "add", BRIDGE, "type", "bridge")
        self.net["bridge"] = BRIDGE
        self._save_pids()
        _ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, name in enumerate(self.names):
            host_end, node_end = f"ittv{i + 1}", f"ittv{i + 1}n"
            _ip("netns", "add", name)
            self.net["netns"].append(name)
            self._save_pids()
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self.net["veths"].append(host_end)
            self._save_pids()
            _ip("link", "set", node_end, "netns", name)
            _ip("link", "set", host_end, "master", BRIDGE)
            _ip("link", "set", host_end, "up")
            _ip("-n", name, "addr", "add", f"{self.addr(i)}/24", "dev", node_end)
            _ip("-n", name, "link", "set", node_end, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        self.net["hosts"] = True
        self._save_pids()
        with open(HOSTS, "a") as f:
            for i, name in enumerate(self.names):
                f.write(f"{self.addr(i)} {name} {HOSTS_TAG}\n")
        self.log(f"network: bridge {BRIDGE} {BRIDGE_ADDR}, " + ", ".join(f"{n} {self.addr(i)}" for i, n in enumerate(self.names)))

    def _teardown(self) -> None:
        teardown_network(self.net, log=self.log)
        self.net = {"bridge": None, "netns": [], "veths": [], "hosts": False}

    def _slurm_conf(self) -> str:
        return slurm_conf(self.state, node_hardware(), ctld_addr=BRIDGE_ADDR,
                          nodes=tuple((n, self.addr(i)) for i, n in enumerate(self.names)))

    def _gres_conf(self) -> str:
        return f"""{MARKER}
# A fake GPU per node: SLURM counts and hands them out; nothing uses the device file.
NodeName={",".join(self.names)} Name=gpu Count=1 File=/dev/null
"""

    def _spawn_slurmd(self) -> None:
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup fs.
        # nsenter and unshare exec without forking, so the PID is slurmd's own.
        for name in self.names:
            self._spawn(f"slurmd@{name}", [tool("nsenter"), f"--net=/run/netns/{name}", tool("unshare"), "--uts", "sh", "-c",
                                           f'hostname {name} && exec {tool("slurmd")} -D -N {name}'])
            self._save_pids()


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
    for name in [*sorted(n for n in rec["pids"] if n.startswith("slurmd")), "slurmctld", "munged"]:
        pid = rec["pids"].get(name)
        if pid is None:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except FileNotFoundError:
            continue
        # the PID was reused by something else: leave it (slurmd@<node> runs as slurmd)
        if Path(cmdline).name != name.split("@")[0]:
            continue
        os.kill(pid, 15)
        for _ in range(300):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        print(f"stopped {name} (pid {pid})")
    _remove_written(rec["written"])
    if rec.get("net"):
        teardown_network(rec["net"], log=print)
    RECORD.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--state", type=Path, default=Path("/tmp/indextts-slurm"), help="folder for the daemons' state and logs (up)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1, help="2: two slurmd nodes in network namespaces (up)")
    args = p.parse_args(argv)
    if args.action == "down":
        stop_from_record()
        return 0
    install()
    cluster = TwoNodeSlurm(args.state) if args.nodes == 2 else LocalSlurm(args.state)
    cluster.start()
    print(subprocess.run([tool("sinfo")], capture_output=True, text=True).stdout)
    print(f"stop it with: python {sys.argv[0]} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
