"""Sandboxed execution of untrusted (model-written) Python programs, and a bounded pool of sandboxes.

One run = one process tree, started as::

    unshare --net --pid --fork --mount-proc --kill-child -- PYTHON -I -S -c BOOT <spec file>

``BOOT`` (below) is PID 1 of a fresh PID namespace, still root: it reads its spec (a root-only file
in the run's temporary directory (marshal), deleted at once), puts private tmpfs over every world-writable
directory (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``) and over the hidden directories
(``/root``, ``/home``, ``/work``; the interpreter's own prefix is bound back read-only), binds the
run's temporary directory as the working directory, joins its pool slot's pids/memory cgroups
(cgroup v1; reused by the slot's runs, one at a time) and forks
the program process. That child sets the rlimits (CPU, AS, FSIZE, NOFILE, NPROC, CORE), sets
``no_new_privs``, drops to an unprivileged uid/gid of its own (one per pool slot, so RLIMIT_NPROC is
really enforced: it is not for root), scrubs the environment, adds a Python audit hook that refuses
non-Unix sockets (second network layer; the first is the empty network namespace) and runs the
program. PID 1 waits for it and reports its exit status and rusage on a status pipe; when PID 1
exits the kernel kills everything left in the namespace.

The parent side (:class:`Sandbox`) starts the tree in its own session, reads stdout/stderr/results
with hard byte caps, enforces the wall-time limit and kills the process group, the namespace and
every task of the slot's cgroups on timeout or output overflow (and after every run). Every layer that is not available on
the host (no ``unshare``, not root, no cgroup v1 controllers) is detected once by
:func:`probe_isolation` and stated in :class:`Isolation` (``describe()``), never silently assumed.

Modes of a :class:`Job`: ``"stdio"`` runs the source as ``__main__`` with the job's stdin;
``"call"`` executes the source and calls ``fn_name(*args)`` for each case (TACO call tests, a
``class Solution`` method works too); ``"assert"`` executes the source and then each test snippet
(HumanEval ``check(candidate)`` / MBPP assert lines). Harness modes report one Python-literal line
per case on a results pipe (parsed with ``ast.literal_eval``); each case has its own interval timer.
"""
from __future__ import annotations

import ast
import contextlib
import itertools
import marshal
import os
import queue
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MEM_EXIT = 86          # program process exit code: MemoryError escaped the program
SETUP_EXIT = 70        # PID 1 could not set the sandbox up
CHILD_SETUP_EXIT = 71  # the program process could not apply limits / drop privileges

# --------------------------------------------------------------------------------------------- #
# The code that runs inside the sandbox (PID 1 + program process). Standard library only.
# --------------------------------------------------------------------------------------------- #
BOOT = r'''
import marshal, os, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384

def _mount(libc, src, tgt, fstype, flags, data):
    import ctypes
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s on %s: %s" % (src, tgt, os.strerror(e)))

def setup_fs(S):
    if not S["mount_ns"]:
        return S["workdir"]
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    work_fd = os.open(S["workdir"], os.O_RDONLY | os.O_DIRECTORY)
    keep = [(p, os.open(p, os.O_PATH)) for p in S["keep_paths"]]
    for d in S["tmpfs"]:
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=1777" % S["tmpfs_kb"])
    for d in S["hide"]:
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for p, fd in keep:
        os.makedirs(p, exist_ok=True)
        _mount(libc, "/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC, None)
        _mount(libc, None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)
    cwd = S["cwd"]
    os.makedirs(cwd, exist_ok=True)
    _mount(libc, "/proc/self/fd/%d" % work_fd, cwd, None, MS_BIND, None)
    os.close(work_fd)
    return cwd

def net_hook(event, args):
    if event == "socket.__new__":
        if args[1] not in (1, -1):        # AF_UNIX (or default resolved later at connect)
            raise PermissionError("network access is disabled in the sandbox")
    elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        if not isinstance(args[1], (str, bytes)):   # AF_UNIX addresses are paths
            raise PermissionError("network access is disabled in the sandbox")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in the sandbox")

def child(S, cwd, res_fd):
    import resource
    try:
        L = S["limits"]
        cpu = max(1, int(L["cpu_s"] + 0.999))
        mb = 1 << 20
        for name, soft, hard in (("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1),
                                 ("RLIMIT_FSIZE", L["fsize_mb"] * mb, L["fsize_mb"] * mb),
                                 ("RLIMIT_NOFILE", L["nofile"], L["nofile"]),
                                 ("RLIMIT_NPROC", L["nproc"], L["nproc"]),
                                 ("RLIMIT_AS", L["memory_mb"] * mb, L["memory_mb"] * mb)):
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if S["uid"] is not None:
            import ctypes
            if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:   # PR_SET_NO_NEW_PRIVS
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            os.setgroups([])
            os.setresgid(S["uid"], S["uid"], S["uid"])
            os.setresuid(S["uid"], S["uid"], S["uid"])
        os.chdir(cwd)
        os.umask(0o077)
        os.environ.clear()
        os.environ.update(S["env"])
        if S["audit_network"]:
            sys.addaudithook(net_hook)
        sys.path[:0] = [cwd]
        sys.argv = ["solution.py"]
        sys.set_int_max_str_digits(0)
    except BaseException as e:
        os.write(2, ("sandbox setup failed: %r\n" % (e,)).encode())
        os._exit(71)
    os._exit(run(S, res_fd))

def _flush():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass

def _exit_code(e):
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:
        pass
    return 1

def _print_exc():
    try:
        import traceback
        traceback.print_exc()
    except BaseException:
        pass

def run(S, res_fd):
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    mode = S["mode"]
    try:
        code = compile(S["source"], "solution.py", "exec")
        if mode == "stdio":
            try:
                exec(code, g)
            finally:
                _flush()
            return 0
        exec(code, g)
    except SystemExit as e:
        _flush()
        return _exit_code(e) if mode == "stdio" or e.code not in (None, 0) else 1
    except MemoryError:
        _flush()
        os.write(2, b"MemoryError\n")
        return 86
    except BaseException:
        _print_exc()
        _flush()
        return 1
    return harness(S, g, res_fd)

class CaseTimeout(BaseException):
    pass

def harness(S, g, res_fd):
    import signal
    def on_alarm(signum, frame):
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    P = S["payload"]
    if S["mode"] == "call":
        name = P["fn_name"]
        fn = g.get(name)
        if not callable(fn) and isinstance(g.get("Solution"), type):
            fn = getattr(g["Solution"](), name, None)
        if not callable(fn):
            os.write(2, ("no callable %r defined\n" % name).encode())
            return 1
        cases = P["cases"]
    else:
        cases = P["tests"]
    import time
    for i, case in enumerate(cases):
        rec = {"i": i}
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, P["case_timeout_s"])
        try:
            if S["mode"] == "call":
                import json
                out = fn(*json.loads(case))
                rec["out"] = json.loads(json.dumps(out, default=repr))
            else:
                exec(compile(case, "test_%d.py" % i, "exec"), g)
            rec["status"] = "ok"
        except CaseTimeout:
            rec["status"] = "timeout"
        except AssertionError as e:
            rec["status"], rec["err"] = "fail", repr(e)[:300]
        except MemoryError:
            rec["status"] = "memory"
        except BaseException as e:
            rec["status"], rec["err"] = "error", repr(e)[:300]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rec["t"] = round(time.perf_counter() - t0, 6)
        line = (repr(rec) + "\n").encode()
        while line:
            line = line[os.write(res_fd, line):]
    _flush()
    return 0

def main():
    spec_path = sys.argv[1]
    with open(spec_path, "rb") as f:
        S = marshal.load(f)
    os.unlink(spec_path)
    stat_fd, res_fd = S["status_fd"], S["result_fd"]
    try:
        cwd = setup_fs(S)
        for cg in S["cgroups"]:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write("0")
    except BaseException as e:
        os.write(stat_fd, (repr({"setup_error": repr(e)}) + "\n").encode())
        os._exit(70)
    pid = os.fork()
    if pid == 0:
        os.close(stat_fd)
        child(S, cwd, res_fd)
    os.close(res_fd)
    while True:
        try:
            _, status, ru = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    rec = {"exit": os.waitstatus_to_exitcode(status), "cpu_s": ru.ru_utime + ru.ru_stime,
           "maxrss_kb": ru.ru_maxrss}
    os.write(stat_fd, (repr(rec) + "\n").encode())
    os._exit(0)

main()
'''


# --------------------------------------------------------------------------------------------- #
# Configuration, isolation probe
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``wall_s``: whole run (parent kills the tree); ``cpu_s``: RLIMIT_CPU of the
    program process; ``memory_mb``: RLIMIT_AS per process and (with a memory cgroup) the run's total;
    ``fsize_mb``: largest file written; ``nproc``: processes (pids cgroup + per-slot-uid RLIMIT_NPROC);
    ``output_bytes``: cap on each of stdout / stderr / results read by the parent."""

    wall_s: float = 5.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    fsize_mb: int = 16
    nofile: int = 64
    nproc: int = 32
    output_bytes: int = 1 << 20

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"SandboxLimits.{k} must be > 0, got {v!r}")
        if self.nofile < 16:
            raise ValueError(f"SandboxLimits.nofile must be >= 16 (the interpreter needs a few), got {self.nofile}")


@dataclass(frozen=True)
class SandboxConfig:
    """How programs are isolated. ``python``: interpreter for programs (default: this one, resolved
    through venv symlinks; programs get the standard library only, ``-I -S``). ``hide``: directories
    replaced by an empty tmpfs (the interpreter prefix is bound back read-only). ``uid_base``: first
    unprivileged uid of the pool's slots (default derived from the pid so concurrent pools differ).
    Each ``use_*`` switch turns a layer off (tests use them to show each layer alone).
    ``workers``: concurrent runs (default: one per core; short programs are latency-bound, so more
    workers raise throughput, but CPU-bound programs then share cores within their wall limit)."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    python: str | None = None
    use_namespaces: bool = True
    drop_privileges: bool = True
    use_cgroups: bool = True
    audit_network: bool = True
    hide: tuple[str, ...] = ("/root", "/home", "/work")
    tmpfs: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
    uid_base: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    queue_size: int = 64


@dataclass(frozen=True)
class Isolation:
    """Which layers are really active on this host (probed once, by running them)."""

    namespaces: bool          # net + pid + mount namespaces via unshare
    privilege_drop: bool      # program runs as an unprivileged uid (we are root)
    pids_cgroup: bool
    memory_cgroup: bool
    audit_network: bool
    notes: tuple[str, ...] = ()

    @property
    def network(self) -> str:
        if self.namespaces:
            return "network namespace (no interfaces)" + (" + audit hook" if self.audit_network else "")
        return "NOT ISOLATED: audit hook only (no network namespace)" if self.audit_network else "NOT ISOLATED"

    @property
    def fork_bomb_defence(self) -> str:
        parts = [n for n, on in (("pids cgroup", self.pids_cgroup), ("per-slot uid RLIMIT_NPROC", self.privilege_drop),
                                 ("pid namespace", self.namespaces)) if on]
        return " + ".join(parts) if parts else "NONE (RLIMIT_NPROC is not enforced for root)"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["network"] = self.network
        d["fork_bomb_defence"] = self.fork_bomb_defence
        return d

    def describe(self) -> str:
        fs = "private tmpfs + hidden dirs (mount namespace)" if self.namespaces else "NOT ISOLATED (no mount namespace)"
        s = (f"network: {self.network}; processes: {self.fork_bomb_defence}; filesystem: {fs}; "
             f"user: {'unprivileged uid' if self.privilege_drop else 'SAME UID AS THE VERIFIER'}; "
             f"memory: RLIMIT_AS{' + memory cgroup' if self.memory_cgroup else ''}")
        return s + ("; " + "; ".join(self.notes) if self.notes else "")


def _others_can_read(path: str) -> bool:
    """Whether a user with no special rights can reach (``o+x`` on every parent) and read ``path``."""
    p = Path(path)
    try:
        if not p.stat().st_mode & 0o004:
            return False
        return all(q.stat().st_mode & 0o001 for q in p.parents)
    except OSError:
        return False


def sandbox_python(cfg: SandboxConfig, mount_ns: bool = True, drop: bool = False) -> str:
    """The interpreter that runs programs: ``cfg.python``, else this interpreter (symlinks resolved).
    Without a mount namespace (which binds the interpreter's prefix back into view) a dropped uid
    must be able to read the standard library itself: then the first readable system interpreter of
    the same version is used instead."""
    if cfg.python:
        return os.path.realpath(cfg.python)
    exe = os.path.realpath(sys.executable)
    if mount_ns or not drop or _others_can_read(os.path.join(sys.base_prefix, "lib")):
        return exe
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        cand = os.path.realpath(os.path.join(d, ver))
        if os.path.isfile(cand) and _others_can_read(cand):
            return cand
    return exe


def _cgroup_dir(controller: str) -> Path | None:
    """This process's cgroup-v1 directory for ``controller`` if it exists and is writable."""
    mnt = Path("/sys/fs/cgroup") / controller
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                d = mnt / path.lstrip("/")
                return d if d.is_dir() and os.access(d, os.W_OK) else None
    except OSError:
        return None
    return None


_PROBE: dict[SandboxConfig, Isolation] = {}
_PROBE_LOCK = threading.Lock()


def probe_isolation(cfg: SandboxConfig) -> Isolation:
    """Detect (by trying them) the isolation layers available for ``cfg`` on this host; cached."""
    key = replace(cfg, workers=1, queue_size=1, uid_base=None)
    with _PROBE_LOCK:
        if key in _PROBE:
            return _PROBE[key]
        notes = []
        ns = False
        if cfg.use_namespaces:
            exe = shutil.which("unshare")
            if exe is None:
                notes.append("util-linux 'unshare' not found")
            else:
                try:
                    r = subprocess.run([exe, "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                                       check=False, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
                    ns = r.returncode == 0
                    if not ns:
                        notes.append("unshare failed: " + r.stderr.decode(errors="replace").strip()[:200])
                except (OSError, subprocess.TimeoutExpired) as e:
                    notes.append(f"unshare failed: {e}")
        drop = cfg.drop_privileges and os.geteuid() == 0
        if cfg.drop_privileges and not drop:
            notes.append("not root: programs run as the verifier's own uid")
        pids = cfg.use_cgroups and _cgroup_dir("pids") is not None
        mem = cfg.use_cgroups and _cgroup_dir("memory") is not None
        if cfg.use_cgroups and not pids:
            notes.append("no writable cgroup-v1 pids controller")
        iso = Isolation(ns, drop, pids, mem, cfg.audit_network, tuple(notes))
        _PROBE[key] = iso
        return iso


@dataclass(frozen=True)
class ContainedRun:
    """What :func:`run_contained` saw: the command's exit status and output, and the outer pids cgroup's
    ``pids.events`` (``{"max": hits}``; empty without a writable pids controller)."""

    returncode: int
    stdout: str
    stderr: str
    pids_events: dict[str, int]


def run_contained(argv: list[str], *, pids_max: int = 200, timeout_s: int = 90, cwd: str | Path | None = None,
                  env: dict[str, str] | None = None) -> ContainedRun:
    """Run a whole process (e.g. a verifier under attack) inside a containment of its own, so even a failed
    sandbox defence cannot take the machine down: an outer pids cgroup (``pids_max`` tasks, when a writable
    cgroup-v1 pids controller exists), ``timeout -s KILL timeout_s`` and a PID namespace (when ``unshare``
    works). ``argv`` is not PID 1 of that namespace (``sh`` is), so signals reach it as usual."""
    outer = None
    base = _cgroup_dir("pids")
    if base is not None:
        outer = base / f"dapo-contained-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        outer.mkdir()
        (outer / "pids.max").write_text(str(pids_max))
    enter = f"echo 0 > {outer}/cgroup.procs && " if outer else ""
    cmd = " ".join(shlex.quote(a) for a in argv)
    inner = (f"timeout -s KILL {timeout_s} unshare --pid --fork --kill-child --mount-proc sh -c {shlex.quote(cmd + '; exit $?')}"
             if probe_isolation(SandboxConfig()).namespaces else f"timeout -s KILL {timeout_s} {cmd}")
    env = env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run(["sh", "-c", enter + "exec " + inner], check=False, cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout_s + 30)
        events: dict[str, int] = {}
        if outer is not None:
            events = {k: int(v) for k, v in (line.split() for line in (outer / "pids.events").read_text().splitlines())}
        return ContainedRun(p.returncode, p.stdout, p.stderr, events)
    finally:
        if outer is not None:
            for _ in range(100):
                try:
                    outer.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


# --------------------------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Job:
    """One program run. ``mode``: ``"stdio"`` | ``"call"`` | ``"assert"``; ``stdin``: bytes fed to
    the program (stdio); ``payload``: ``{"fn_name", "cases": [json args list]}`` (call) or
    ``{"tests": [code]}`` (assert), plus ``case_timeout_s``; ``limits``: overrides the config's."""

    mode: str
    source: str
    stdin: bytes = b""
    payload: dict = field(default_factory=dict)
    limits: SandboxLimits | None = None

    def __post_init__(self):
        if self.mode not in ("stdio", "call", "assert"):
            raise ValueError(f"Job.mode must be 'stdio', 'call' or 'assert', got {self.mode!r}")


@dataclass
class RunResult:
    """Outcome of one run. ``status``: ``"exited"`` (see ``exit_code``; negative = killed by that
    signal), ``"timeout"`` (wall or CPU limit), ``"memory_limit"``, ``"output_limit"`` or
    ``"sandbox_error"`` (the sandbox itself failed: ``detail`` says why). ``results``: the harness's
    per-case records (call/assert modes)."""

    status: str
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    results: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = None
    maxrss_kb: int | None = None
    detail: str = ""


class _Cgroups:
    """The cgroup-v1 directories (pids, memory) of one pool slot, reused by its runs (one at a time).

    The slot's worker thread joins them once (:meth:`attach_thread`, a thread-level move through
    ``tasks``): every process it then spawns starts inside them, so a run costs no cgroup migration
    (each one waits for an RCU grace period, several ms). The thread itself is never signalled:
    :meth:`kill_all` skips every task of this process."""

    def __init__(self, bases: dict[str, Path], name: str):
        self.dirs = {ctrl: base / name for ctrl, base in bases.items()}
        self.attached = False
        self._written: dict[str, str] = {}

    def _ensure(self) -> None:
        for ctrl, d in self.dirs.items():
            if not d.is_dir():               # (re)created: another process may have pruned an empty parent
                d.parent.mkdir(exist_ok=True)
                d.mkdir(exist_ok=True)
                self._written.pop(ctrl, None)

    def attach_thread(self) -> None:
        """Move the calling thread (only) into the slot's cgroups."""
        if not self.dirs:
            return
        self._ensure()
        tid = str(threading.get_native_id())
        for d in self.dirs.values():
            (d / "tasks").write_text(tid)
        self.attached = True

    def prepare(self, lim: SandboxLimits) -> int:
        """Make sure the directories exist, hold no process and carry ``lim``; returns the OOM-kill
        count so far. pids: the program's ``nproc`` plus this worker thread, ``unshare`` and PID 1."""
        if not self.attached:
            self._ensure()
        want = {"pids": ("pids.max", str(lim.nproc + 3)),
                "memory": ("memory.limit_in_bytes", str((lim.memory_mb + 64) << 20))}   # + PID 1 etc.
        for ctrl, d in self.dirs.items():
            fname, value = want[ctrl]
            if self._written.get(ctrl) != value:
                (d / fname).write_text(value)
                self._written[ctrl] = value
        self.kill_all(self.dirs)
        return self.oom_kills()

    def oom_kills(self) -> int:
        d = self.dirs.get("memory")
        if d is None:
            return 0
        try:
            for line in (d / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def foreign_tasks(dirs: dict[str, Path]) -> set[int]:
        """Thread-group ids of the tasks in ``dirs`` that are not this process (host pid namespace)."""
        me, out = os.getpid(), set()
        for d in dirs.values():
            try:
                tids = (d / "tasks").read_text().split()
            except OSError:
                continue
            for tid in tids:
                try:
                    status = Path(f"/proc/{tid}/status").read_text()
                    tgid = int(status.split("\nTgid:", 1)[1].split()[0])
                except (OSError, IndexError, ValueError):
                    continue                   # already gone
                if tgid != me:
                    out.add(tgid)
        return out

    @staticmethod
    def kill_all(dirs: dict[str, Path]) -> None:
        """SIGKILL every process in ``dirs`` except this one, until none is left."""
        for _ in range(500):
            pids = _Cgroups.foreign_tasks(dirs)
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    @staticmethod
    def remove(d: Path) -> None:
        for _ in range(200):
            try:
                d.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                _Cgroups.kill_all({"x": d})
                time.sleep(0.01)


_UID_SEQ = itertools.count()


class Sandbox:
    """Runs :class:`Job` s one at a time in slot ``slot`` (its own uid). Thread-confined: a pool
    gives each worker thread its own Sandbox (and cgroups: a Sandbox made without a pool has no
    cgroup layer). :meth:`run` never raises for a bad program; an internal failure is a
    ``sandbox_error`` result."""

    def __init__(self, cfg: SandboxConfig = SandboxConfig(), slot: int = 0, cgroup_bases: dict[str, Path] | None = None):
        self.cfg = cfg
        self.iso = probe_isolation(cfg)
        self.python = sandbox_python(cfg, self.iso.namespaces, self.iso.privilege_drop)
        base = cfg.uid_base if cfg.uid_base is not None else 200_000 + (os.getpid() % 100_000) * 256
        # a uid of its own per Sandbox of this process (RLIMIT_NPROC counts per uid), wrapping at 256
        self.uid = base + next(_UID_SEQ) % 256 if self.iso.privilege_drop else None
        self.slot = slot
        self.cgroups = _Cgroups(cgroup_bases or {}, f"slot-{slot}")
        prefix = sys.base_prefix if not cfg.python else str(Path(self.python).parent.parent)
        keep = os.path.realpath(prefix)
        self.keep_paths = [keep] if any(keep == h or keep.startswith(h.rstrip("/") + "/") for h in cfg.hide) else []
        self.hide = [h for h in cfg.hide if os.path.isdir(h)]
        self.tmpfs = [t for t in cfg.tmpfs if os.path.isdir(t)]
        self.unshare = shutil.which("unshare") if self.iso.namespaces else None

    # -- process tree ------------------------------------------------------------------------ #
    def run(self, job: Job) -> RunResult:
        lim = job.limits or self.cfg.limits
        t0 = time.monotonic()
        try:
            return self._run(job, lim, t0)
        except Exception as e:  # noqa: BLE001 - the sandbox must keep serving
            return RunResult("sandbox_error", detail=f"{type(e).__name__}: {e}", wall_s=time.monotonic() - t0)

    def _run(self, job: Job, lim: SandboxLimits, t0: float) -> RunResult:
        cg_dirs: dict[str, Path] = self.cgroups.dirs
        oom0 = 0
        fds: list[int] = []
        proc = None
        with tempfile.TemporaryDirectory(prefix="dapo-sbx-") as work, tempfile.TemporaryFile() as stdin_f:
            try:
                if self.uid is not None:
                    os.chown(work, self.uid, self.uid)
                os.chmod(work, 0o700)
                stdin_f.write(job.stdin)
                stdin_f.seek(0)
                res_r, res_w = os.pipe()
                st_r, st_w = os.pipe()
                fds += [res_r, res_w, st_r, st_w]
                if cg_dirs:
                    oom0 = self.cgroups.prepare(lim)
                cwd = "/tmp/work" if self.unshare else work
                spec = {"mode": job.mode, "source": job.source, "payload": job.payload, "limits": asdict(lim),
                        "uid": self.uid, "workdir": work, "cwd": cwd, "mount_ns": bool(self.unshare),
                        "keep_paths": self.keep_paths, "hide": self.hide, "tmpfs": self.tmpfs,
                        "tmpfs_kb": lim.fsize_mb * 1024, "cgroups": [] if self.cgroups.attached else [str(d) for d in cg_dirs.values()],
                        "status_fd": st_w, "result_fd": res_w, "audit_network": self.cfg.audit_network,
                        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8",
                                "TMPDIR": "/tmp"}}
                spec_path = os.path.join(work, ".spec")
                fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    marshal.dump(spec, f)
                cmd = [self.python, "-I", "-S", "-c", BOOT, spec_path]
                if self.unshare:
                    cmd = [self.unshare, "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"] + cmd
                proc = subprocess.Popen(cmd, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=(res_w, st_w), cwd=work, start_new_session=True,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
                os.close(res_w)
                os.close(st_w)
                fds = [res_r, st_r]
                return self._supervise(proc, res_r, st_r, lim, t0, oom0)
            finally:
                if proc is not None:
                    if proc.poll() is None:
                        self._kill(proc, cg_dirs)
                    for pipe in (proc.stdout, proc.stderr):
                        pipe.close()
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                if cg_dirs:
                    _Cgroups.kill_all(cg_dirs)     # nothing of this run may outlive it
                # programs may leave files they own (mode 0700 dirs): make them removable by us
                _make_removable(work)

    def _kill(self, proc: subprocess.Popen, cg_dirs: dict[str, Path]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _Cgroups.kill_all(cg_dirs)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _supervise(self, proc, res_r, st_r, lim, t0, oom0: int) -> RunResult:
        cg_dirs = self.cgroups.dirs
        caps = {"stdout": lim.output_bytes, "stderr": lim.output_bytes, "results": 4 * lim.output_bytes + 65536,
                "status": 65536}
        bufs = {k: bytearray() for k in caps}
        sel = selectors.DefaultSelector()
        for name, fobj in (("stdout", proc.stdout), ("stderr", proc.stderr), ("results", res_r), ("status", st_r)):
            fd = fobj if isinstance(fobj, int) else fobj.fileno()
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        deadline = t0 + lim.wall_s
        status, detail = None, ""
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    status, detail = "timeout", f"wall time limit {lim.wall_s:g} s"
                    break
                for key, _ in sel.select(timeout=min(left, 0.5)):
                    name = key.data
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    room = caps[name] - len(bufs[name])
                    bufs[name] += chunk[:max(room, 0)]
                    if len(chunk) > room:
                        status, detail = "output_limit", f"{name} exceeded {caps[name]} bytes"
                        break
                if status:
                    break
        finally:
            sel.close()
        if status:
            self._kill(proc, cg_dirs)
        else:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status, detail = "timeout", f"wall time limit {lim.wall_s:g} s"
                self._kill(proc, cg_dirs)
        wall = time.monotonic() - t0
        out = RunResult(status or "exited", stdout=bytes(bufs["stdout"]), stderr=bytes(bufs["stderr"]),
                        wall_s=wall, detail=detail)
        for line in bytes(bufs["results"]).splitlines():
            rec = _literal(line)
            if isinstance(rec, dict) and isinstance(rec.get("i"), int):
                out.results.append(rec)
        st = None
        for line in bytes(bufs["status"]).splitlines():
            st = _literal(line)
        oom = self.cgroups.oom_kills() > oom0
        if isinstance(st, dict):
            if "setup_error" in st:
                out.status, out.detail = "sandbox_error", "sandbox setup: " + str(st["setup_error"])
                return out
            out.exit_code, out.cpu_s, out.maxrss_kb = st.get("exit"), st.get("cpu_s"), st.get("maxrss_kb")
        if out.status != "exited":
            if out.status == "timeout" and oom:
                out.status, out.detail = "memory_limit", "memory cgroup limit hit (then wall limit)"
            return out
        if out.exit_code is None:
            out.status, out.detail = "sandbox_error", f"no status from the sandbox (exit {proc.returncode})"
            return out
        if out.exit_code == CHILD_SETUP_EXIT and out.stderr.startswith(b"sandbox setup failed"):
            out.status, out.detail = "sandbox_error", out.stderr.decode(errors="replace").strip()
        elif out.exit_code == MEM_EXIT or oom:
            out.status, out.detail = "memory_limit", ("memory cgroup OOM" if oom else "MemoryError (RLIMIT_AS)")
        elif out.exit_code == -signal.SIGXCPU or (out.exit_code == -signal.SIGKILL and out.cpu_s is not None
                                                  and out.cpu_s >= lim.cpu_s - 0.05):
            # SIGXCPU comes only from RLIMIT_CPU's soft limit (a program raising it itself still failed);
            # the kernel's tick-based CPU accounting can read below the limit on a loaded machine.
            out.status, out.detail = "timeout", f"CPU time limit {lim.cpu_s:g} s"
        return out


def _literal(line: bytes) -> Any:
    """A Python literal written by the sandbox (untrusted: ``ast.literal_eval`` only), or None."""
    try:
        return ast.literal_eval(line.decode("utf-8", errors="replace"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _make_removable(path: str) -> None:
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------- #
# Pool
# --------------------------------------------------------------------------------------------- #
class SandboxPool:
    """``cfg.workers`` threads, each with its own :class:`Sandbox` (slot uid, cgroups), fed from a
    bounded queue of ``cfg.queue_size`` tasks: :meth:`submit` blocks while the queue is full.

    A task is a callable ``task(sandbox) -> T`` (e.g. run every test of one program); :meth:`submit`
    returns a :class:`concurrent.futures.Future`. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, cfg: SandboxConfig = SandboxConfig()):
        if cfg.workers < 1 or cfg.workers > 256:
            raise ValueError(f"SandboxConfig.workers must be in 1..256, got {cfg.workers}")
        if cfg.queue_size < 1:
            raise ValueError(f"SandboxConfig.queue_size must be >= 1, got {cfg.queue_size}")
        self.cfg = cfg
        self.iso = probe_isolation(cfg)
        self._cg_bases: dict[str, Path] = {}
        for ctrl, on in (("pids", self.iso.pids_cgroup), ("memory", self.iso.memory_cgroup)):
            if on:
                parent = _cgroup_dir(ctrl)
                _remove_stale(parent)
                d = parent / f"dapo-sandbox-{os.getpid()}-{id(self):x}"
                d.mkdir()
                self._cg_bases[ctrl] = d
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(Sandbox(cfg, slot, self._cg_bases),),
                                          name=f"sandbox-{slot}", daemon=True) for slot in range(cfg.workers)]
        for t in self._threads:
            t.start()

    def _worker(self, sb: Sandbox) -> None:
        try:
            sb.cgroups.attach_thread()
        except OSError:
            pass        # each run then joins the cgroups itself (slower, same limits)
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, task = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(task(sb))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def submit(self, task: Callable[[Sandbox], T]) -> Future[T]:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        fut: Future = Future()
        self._q.put((fut, task))
        return fut

    def map(self, tasks: list[Callable[[Sandbox], T]]) -> list[T]:
        """Run ``tasks`` on the pool (bounded queue: submission waits for room); results in order."""
        futs: list[Future] = []
        for t in tasks:
            futs.append(self.submit(t))
        return [f.result() for f in futs]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        for d in self._cg_bases.values():
            if d.is_dir():
                for sub in d.iterdir():
                    if sub.is_dir():
                        _Cgroups.remove(sub)
            _Cgroups.remove(d)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _remove_stale(parent: Path, min_age_s: float = 3600.0) -> None:
    """Remove empty ``dapo-sandbox-<pid>-*`` cgroups of processes that look dead and that are older
    than ``min_age_s`` (a pid may be invisible from another PID namespace, so age is required too;
    a live pool re-creates its directory if it was pruned anyway)."""
    now = time.time()
    for d in parent.glob("dapo-sandbox-*"):
        try:
            pid = int(d.name.split("-")[2])
            old = now - d.stat().st_mtime > min_age_s
        except (IndexError, ValueError, OSError):
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists() or not old:
            continue
        for sub in [*d.glob("slot-*"), d]:
            try:
                sub.rmdir()
            except OSError:
                pass


__all__ = ["BOOT", "Isolation", "Job", "RunResult", "Sandbox", "SandboxConfig", "SandboxLimits", "SandboxPool",
           "probe_isolation", "sandbox_python"]
