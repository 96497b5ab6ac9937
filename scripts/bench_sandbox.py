#!/usr/bin/env python
"""Benchmark the code-verifier sandbox, in one run:

* throughput for trivial programs (one stdin/stdout test each; the cost is the sandbox itself):
  the pool (``--workers``, default one per core) vs sequential verification, and a plain unsandboxed
  ``python -I -S`` subprocess per program as the floor;
* ``--attacks``: the adversarial catalogue -> verdict -> time to verdict, as a markdown table
  (the table in docs/code_sandbox.md). The attacks run inside an outer pids cgroup (limit 300),
  ``timeout -s KILL`` and a PID namespace, so a failed defence cannot take the machine down.

Prints ``RESULT <name> <value> <unit>`` lines::

    RESULT sandbox_programs_per_s_pool <v> programs/s
    RESULT sandbox_programs_per_s_sequential <v> programs/s
    RESULT sandbox_pool_speedup <v> x
    RESULT unsandboxed_programs_per_s <v> programs/s
    RESULT sandbox_overhead_ms <v> ms/program        (sequential sandboxed - unsandboxed, per program)
    RESULT attack_<name>_s <v> s                     (with --attacks: time to verdict)

Usage: .venv/bin/python scripts/bench_sandbox.py [--programs 200] [--workers N (default: cores)] [--attacks]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dapo_mcore.verify.code import CodeVerifier, CodeVerifierConfig
from dapo_mcore.verify.sandbox import (
    SandboxConfig,
    probe_isolation,
    run_contained,
    sandbox_python,
)

TRIVIAL = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def trivial_pairs(n: int) -> list[tuple[str, str]]:
    return [(TRIVIAL, json.dumps({"inputs": [f"{i} {i + 1}\n"], "outputs": [f"{2 * i + 1}\n"]})) for i in range(n)]


def bench_throughput(n: int, workers: int) -> dict:
    pairs = trivial_pairs(n)
    out = {}
    pool_v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=10.0, sandbox=SandboxConfig(workers=workers)))
    seq_v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=10.0, sandbox=SandboxConfig(workers=1)))
    try:
        pool_v.verify_many(pairs[:4])                       # warm-up (pool start, page cache)
        seq_v.verify(*pairs[0])
        t = time.perf_counter()
        r_pool = pool_v.verify_many(pairs)
        out["pool"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        r_seq = [seq_v.verify(text, ans) for text, ans in pairs]
        out["sequential"] = n / (time.perf_counter() - t)
    finally:
        pool_v.close()
        seq_v.close()
    if sum(r_pool) != n or sum(r_seq) != n:
        raise SystemExit(f"trivial programs failed: pool {sum(r_pool)}/{n}, sequential {sum(r_seq)}/{n}")
    py = sandbox_python(SandboxConfig())
    t = time.perf_counter()
    for i in range(n):
        p = subprocess.run([py, "-I", "-S", "-c", "a, b = map(int, input().split())\nprint(a + b)\n"], check=False,
                           input=f"{i} {i + 1}\n", capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert p.stdout == f"{2 * i + 1}\n"
    out["unsandboxed"] = n / (time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------------- attacks
ATTACKS = [
    ("infinite_loop", "infinite loop", "while True:\n    pass\n"),
    ("sleep", "sleep past the limit", "import time\ntime.sleep(100)\n"),
    ("fork_bomb", "fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    ("memory_bomb", "memory bomb", "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n"),
    ("output_1gb", "1 GB of output", "import sys\nc = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(c)\n"),
    ("file_1gb", "1 GB into a file", ("c = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n"
                                      "    for _ in range(1024):\n        f.write(c)\n")),
    ("write_outside", "write outside the temp dir",
     ("import os\nfor p in ['/etc/pwned-{n}', '/root/pwned-{n}', '{root}/pwned-{n}', '/usr/pwned-{n}']:\n"
      "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n    except OSError as e:\n"
      "        print(p, type(e).__name__)\nprint(input())\n")),
    ("env_secrets", "read the parent's environment secrets",
     ("import os\nleak = [k for k in os.environ if 'SECRET' in k]\nfor p in os.listdir('/proc'):\n"
      "    try:\n        leak.append(open('/proc/%s/environ' % p, 'rb').read())\n    except OSError:\n        pass\n"
      "assert not any(b'{secret}' in (x if isinstance(x, bytes) else x.encode()) for x in leak), 'LEAKED'\n"
      "print(input())\n")),
    ("network", "open a network connection",
     "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'x')\nprint(input())\n"),
    ("kill_parent", "kill the parent (ppid, 1, -1, every pid, own group)",
     ("import os, signal\nfor t in [os.getppid(), 1, -1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
      "    if t != os.getpid():\n        try:\n            os.kill(t, signal.SIGKILL)\n        except OSError:\n"
      "            pass\nos.killpg(0, signal.SIGKILL)\n")),
    ("syntax_error", "syntax error", "def f(:\n    return 1\n"),
    ("partial", "passes 2 of 3 tests", "n = int(input())\nprint(n if n != 2 else 0)\n"),
]


def run_attacks(limit_s: float) -> list[dict]:
    import socket

    secret = "dapo-secret-" + uuid.uuid4().hex
    os.environ["DAPO_BENCH_SECRET"] = secret
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    nonce = uuid.uuid4().hex[:8]
    v = CodeVerifier(cfg=CodeVerifierConfig(timeout_s=limit_s, fail_fast=False))
    rows = []
    try:
        for key, label, src in ATTACKS:
            src = src.replace("{n}", nonce).replace("{root}", str(ROOT)).replace("{secret}", secret)
            src = src.replace("{port}", str(port))
            spec = ({"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "2\n", "3\n"]} if key == "partial"
                    else {"inputs": ["ok\n"], "outputs": ["ok\n"]})
            t = time.perf_counter()
            res = v.evaluate_many([(f"```python\n{src}```", spec)])[0]
            dt = time.perf_counter() - t
            still = v.verify("```python\nprint(input())\n```", json.dumps({"inputs": ["y\n"], "outputs": ["y\n"]}))
            host = []
            for p in (f"/etc/pwned-{nonce}", f"/root/pwned-{nonce}", f"{ROOT}/pwned-{nonce}", f"/usr/pwned-{nonce}"):
                if os.path.exists(p):
                    host.append("file " + p)
                    os.unlink(p)
            try:
                srv.accept()
                host.append("connection received")
            except TimeoutError:
                pass
            tests = " ".join(x.verdict for x in res.tests)
            rows.append({"key": key, "attack": label, "verdict": res.verdict, "tests": tests, "time_s": dt,
                         "detail": res.detail[:70], "still_serving": still == 1.0, "host_untouched": not host,
                         "host": host})
    finally:
        v.close()
        srv.close()
    rows.append({"isolation": probe_isolation(SandboxConfig()).describe()})
    return rows


def contained_attacks(limit_s: float) -> list[dict]:
    """Re-run this script with ``--attacks-inner`` inside :func:`run_contained` (outer pids cgroup limit 300,
    ``timeout -s KILL 300``, PID namespace)."""
    r = run_contained([sys.executable, str(Path(__file__).resolve()), "--attacks-inner", "--limit", str(limit_s)],
                      pids_max=300, timeout_s=300, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"contained attack run failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    if "max" in r.pids_events:
        rows[-1]["outer_pids_limit_hits"] = r.pids_events["max"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--attacks", action="store_true", help="also run the adversarial table")
    ap.add_argument("--limit", type=float, default=2.0, help="per-test time limit for the attacks (s)")
    ap.add_argument("--attacks-inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.attacks_inner:
        print(json.dumps(run_attacks(a.limit)))
        return
    iso = probe_isolation(SandboxConfig())
    print(f"isolation: {iso.describe()}", flush=True)
    tp = bench_throughput(a.programs, a.workers)
    seq_ms, raw_ms = 1000 / tp["sequential"], 1000 / tp["unsandboxed"]
    print(f"trivial programs ({a.programs}): pool x{a.workers} {tp['pool']:.1f}/s, sequential {tp['sequential']:.1f}/s "
          f"({seq_ms:.1f} ms each), unsandboxed subprocess {tp['unsandboxed']:.1f}/s ({raw_ms:.1f} ms each)")
    if a.attacks:
        rows = contained_attacks(a.limit)
        info = rows.pop()
        print(f"\nper-test limit {a.limit:g} s; {info['isolation']}; outer safety cgroup limit hits: "
              f"{info.get('outer_pids_limit_hits', 'n/a')}\n")
        print("| attack | verdict | per-test verdicts | time to verdict | still serving | host untouched |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['attack']} | {r['verdict']} | {r['tests']} | {r['time_s']:.2f} s | "
                  f"{'yes' if r['still_serving'] else 'NO'} | {'yes' if r['host_untouched'] else 'NO: ' + ', '.join(r['host'])} |")
        print()
        for r in rows:
            print(f"RESULT attack_{r['key']}_s {r['time_s']:.3f} s")
    print(f"RESULT sandbox_programs_per_s_pool {tp['pool']:.2f} programs/s")
    print(f"RESULT sandbox_programs_per_s_sequential {tp['sequential']:.2f} programs/s")
    print(f"RESULT sandbox_pool_speedup {tp['pool'] / tp['sequential']:.2f} x")
    print(f"RESULT unsandboxed_programs_per_s {tp['unsandboxed']:.2f} programs/s")
    print(f"RESULT sandbox_overhead_ms {seq_ms - raw_ms:.1f} ms/program")


if __name__ == "__main__":
    main()
