"""A real ``sglang-router`` (cache_aware policy) in front of two embedded-engine servers speaking
SGLang's schema: each state's n samples are served by one server, requests that repeat or extend a
state follow it to the same server, distinct concurrent states spread over both servers, and the
results (client and mc stage) equal a run without the router. Routing is read from the servers'
side: their ``/get_server_info`` request logs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dapo_mcore.data.shards import iter_records
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.common import BackendConfig
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig
from dapo_mcore.generate.stage import GenerateConfig, run_generate
from dapo_mcore.mc.stage import MCConfig, run_mc
from dapo_mcore.rollout.server import EmbeddedServer, prompt_key
from dapo_mcore.rollout.sglang_client import SGLangClient, SGLangClientConfig
from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems
from dapo_mcore.tasks.chain import make_problems

torch.set_num_threads(1)

ROUTER_BIN = shutil.which("sglang-router", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                 os.environ.get("PATH", "")]))
pytestmark = pytest.mark.skipif(ROUTER_BIN is None, reason="sglang-router is not installed "
                                                           "(pip install 'sglang-router>=0.3.2', the dev extra)")
READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _router_ready(url: str, worker_urls: list[str]) -> bool:
    """The router answers /health and lists every worker as registered and healthy."""
    try:
        if httpx.get(f"{url}/health", timeout=2).status_code != 200:
            return False
        workers = httpx.get(f"{url}/workers", timeout=2).json().get("workers", [])
    except (httpx.HTTPError, ValueError):
        return False
    healthy = {w.get("url") for w in workers if w.get("is_healthy")}
    return set(worker_urls) <= healthy


def _launch_router(worker_urls: list[str], log_path: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start ``sglang-router launch --policy cache_aware`` on a free loopback port; wait (bounded)
    until it has registered all workers. Retries on a fresh port if the process exits early (a
    port taken between probing and binding)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for attempt in range(attempts):
        port = _free_port()
        cmd = [ROUTER_BIN, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls,
               "--policy", "cache_aware", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port()),
               "--worker-startup-timeout-secs", str(int(READY_TIMEOUT_S)), "--worker-startup-check-interval", "1",
               "--shutdown-grace-period-secs", "2", "--log-level", "warn"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _router_ready(url, worker_urls):
                return proc, url
            time.sleep(0.1)
        _stop(proc)
        if time.monotonic() >= deadline or attempt == attempts - 1:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"sglang-router at {url} not ready with workers {worker_urls} "
                               f"(exit code {proc.returncode}); log {log_path}:\n{tail}")
    raise AssertionError("unreachable")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # same directory and build as tests/test_rollout_http.py: built once per session
    return build_toy_completer(tmp_path_factory.getbasetemp() / "toy_completer", steps=100)


@pytest.fixture(scope="module")
def servers(toy):
    """Two independent embedded-engine servers (own engine, own port) on 127.0.0.1."""
    srvs: list[EmbeddedServer] = []
    try:
        for _ in range(2):
            srvs.append(EmbeddedServer(EmbeddedEngine(EngineConfig(str(toy)))).start())
        yield srvs
    finally:
        for s in srvs:
            s.stop()


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    proc, url = _launch_router([s.url for s in servers], tmp_path_factory.mktemp("router") / "router.log")
    try:
        yield url
    finally:
        _stop(proc)


def _server_log(srv: EmbeddedServer, after: int = 0) -> list[dict]:
    """The server's request log as it reports it over HTTP, entries with ``seq > after``."""
    info = httpx.get(f"{srv.url}/get_server_info", timeout=10).json()
    return [e for e in info["request_log"] if e["seq"] > after]


def _where(servers, marks: list[int]) -> dict[str, list[tuple[int, dict]]]:
    """prompt key -> [(server index, log entry)] for every request since ``marks``."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for i, (srv, m) in enumerate(zip(servers, marks)):
        for e in _server_log(srv, m):
            for k in e["prompts"]:
                out.setdefault(k, []).append((i, e))
    return out


def _marks(servers) -> list[int]:
    return [httpx.get(f"{s.url}/get_server_info", timeout=10).json()["requests_served"] for s in servers]


def test_router_registers_both_servers_and_logs(router, servers):
    workers = httpx.get(f"{router}/workers", timeout=10).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(s.url for s in servers)
    assert all(w["is_healthy"] for w in workers)
    # the request log itself: one batched request of two prompts with n=2 -> one entry, 4 samples
    srv, mark = servers[0], _marks(servers)[0]
    tok = srv.engine.tokenizer
    a, b = (tok(p.prompt)["input_ids"] for p in make_problems(2, seed=11))
    r = httpx.post(f"{srv.url}/generate", timeout=60, json={"input_ids": [a, b], "sampling_params": {
        "max_new_tokens": 3, "temperature": 1.0, "n": 2, "sampling_seed": 0}})
    assert r.status_code == 200 and len(r.json()) == 4
    (entry,) = _server_log(srv, mark)
    assert entry == {"seq": mark + 1, "prompts": [prompt_key(a), prompt_key(b)], "n": 2, "samples": 4}


def _same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [s["output_ids"] for s in x] == [s["output_ids"] for s in y]
        assert [s["text"] for s in x] == [s["text"] for s in y]
        assert [s["meta_info"]["finish_reason"] for s in x] == [s["meta_info"]["finish_reason"] for s in y]


def test_states_stick_to_one_server_and_spread(router, servers, toy):
    """8 distinct states (n=4 each, sent concurrently), then for each a repeat (new seed) and an
    extension by one solution step: every request's samples come from one server, repeats and
    extensions land on their state's server, both servers get states, outputs equal a direct run."""
    n = 4
    tok = servers[0].engine.tokenizer
    probs = make_problems(8, seed=5)
    states = [tok(p.prompt)["input_ids"] for p in probs]
    steps = [tok(p.solution().split("\n")[0] + "\n", add_special_tokens=False)["input_ids"] for p in probs]
    extended = [s + st for s, st in zip(states, steps)]

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=16, temperature=1.0, n=n, sampling_seed=seed)

    first = [GenRequest(s, params(i)) for i, s in enumerate(states)]
    again = ([GenRequest(s, params(100 + i)) for i, s in enumerate(states)]
             + [GenRequest(e, params(200 + i)) for i, e in enumerate(extended)])
    assert len({prompt_key(x) for x in states + extended}) == 16

    marks = _marks(servers)
    client = SGLangClient(SGLangClientConfig(router, concurrency=len(first), timeout_s=60, health_timeout_s=10))
    try:
        out_first = client.generate(first)
        home = {}
        for k, hits in _where(servers, marks).items():
            assert len(hits) == 1, f"state {k} served {len(hits)} times: {hits}"
            (i, e), = hits
            assert e["prompts"] == [k] and e["n"] == n and e["samples"] == n
            home[k] = i
        assert set(home) == {prompt_key(s) for s in states}
        assert set(home.values()) == {0, 1}, f"distinct concurrent states all went to one server: {home}"

        marks = _marks(servers)
        out_again = client.generate(again)
    finally:
        client.close()
    where = _where(servers, marks)
    assert len(where) == 16 and all(len(h) == 1 and h[0][1]["samples"] == n for h in where.values())
    for s, e in zip(states, extended):
        assert where[prompt_key(s)][0][0] == home[prompt_key(s)], "a repeated state left its server"
        assert where[prompt_key(e)][0][0] == home[prompt_key(s)], "an extended state left its prefix's server"

    direct = EmbeddedEngine(EngineConfig(str(toy)))  # no router, no HTTP
    _same(out_first, direct.generate(first))
    _same(out_again, direct.generate(again))


def test_mc_stage_through_router_equals_embedded(router, servers, toy, tmp_path):
    """generate (embedded) then mc with backend=sglang at the router: same records as in-process mc;
    every non-terminal state was one request, served once, by one server, with all N samples."""
    probs = write_chain_problems(tmp_path / "p.jsonl", 3, seed=21)
    run_generate(GenerateConfig(str(probs), str(toy), num_samples=4, keep=2, max_new_tokens=32, shard_size=2,
                                show_progress=False), tmp_path / "gen")
    N = 3
    mc = {"num_completions": N, "max_new_tokens": 24, "shard_size": 8, "batch_requests": 8, "show_progress": False}
    marks = _marks(servers)
    s = run_mc(MCConfig(str(toy), backend=BackendConfig("sglang", url=router, concurrency=8, timeout_s=60), **mc),
               tmp_path / "gen", tmp_path / "mc_router")
    where = _where(servers, marks)
    run_mc(MCConfig(str(toy), **mc), tmp_path / "gen", tmp_path / "mc_emb")
    recs = list(iter_records(tmp_path / "mc_router"))
    assert recs == list(iter_records(tmp_path / "mc_emb"))
    open_states = [r for r in recs if not r["terminal"]]
    assert open_states and s["throughput"]["samples"] == N * len(open_states)
    keys = {prompt_key(r["prompt_ids"] + [t for st in r["step_ids"] for t in st]) for r in open_states}
    assert set(where) == keys                                   # no other traffic, nothing missing
    for k, hits in where.items():
        assert len(hits) == 1, f"state {k} served {len(hits)} times"
        (_, e), = hits
        assert e["prompts"] == [k] and e["n"] == N and e["samples"] == N
