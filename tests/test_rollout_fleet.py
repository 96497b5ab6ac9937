"""The SGLang fleet library (dapo_mcore/rollout/fleet.py) without SGLang: launch commands, process
groups, health errors with log tails, served-model checks, swaps, recovery after SIGKILL, a weight
version changed mid-stage, and a real sglang-router in front of launched servers. The servers are
tests/sglang_fake_server.py (SGLang's routes and response shapes, no model); the same paths against
the real SGLang server are in tests/test_sglang_real.py (``-m sglang``)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout import fleet as fleet_mod
from dapo_mcore.rollout.common import BackendConfig, make_backend
from dapo_mcore.rollout.fleet import (CPU_SERVER_ARGS, Fleet, FleetBackend, FleetError, ManagedProcess, ModelMismatch,
                                      ServedModelChanged, _group_members, checkpoint_version, free_ports,
                                      router_command, same_model, server_command, serving)
from dapo_mcore.rollout.sglang_client import SGLangError

FAKE = Path(__file__).resolve().parent / "sglang_fake_server.py"
ROUTER_BIN = shutil.which("sglang-router", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                 os.environ.get("PATH", "")]))


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory) -> str:
    """An executable that stands where SGLang's python would: runs the fake server with our python."""
    p = tmp_path_factory.mktemp("fake_sglang") / "python"
    p.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """Two 'checkpoints' (directories with a config and a shared tokenizer file)."""
    out = []
    for name in ("model_a", "model_b"):
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text('{"model_type": "qwen2"}')
        (d / "tokenizer.json").write_text('{"same": "tokenizer"}')
        out.append(str(d))
    return out[0], out[1]


def _cfg(fake_python: str, tmp_path: Path, **kw) -> BackendConfig:
    base = dict(kind="sglang", launch=True, python=fake_python, port=0, device="cpu", launch_timeout_s=30,
                recover_timeout_s=30, stop_grace_s=5, log_dir=str(tmp_path / "logs"))
    base.update(kw)
    return BackendConfig(**base)


def test_server_and_router_commands():
    cpu = BackendConfig("sglang", server_args=["--context-length", "512"])
    argv, env = server_command(cpu, "/ckpt/a", 30001, python="/venv/bin/python", device="cpu", weight_version="a@1")
    assert argv[:3] == ["/venv/bin/python", "-m", "sglang.launch_server"]
    assert argv[3:9] == ["--model-path", "/ckpt/a", "--host", "127.0.0.1", "--port", "30001"]
    assert "--weight-version" in argv and argv[argv.index("--weight-version") + 1] == "a@1"
    assert " ".join(CPU_SERVER_ARGS) in " ".join(argv) and argv[-2:] == ["--context-length", "512"]
    assert env == {"SGLANG_USE_CPU_ENGINE": "1"} and "--tp-size" not in argv
    gpu = BackendConfig("sglang", tp=2, dp=2, mem_fraction_static=0.7)
    argv, env = server_command(gpu, "/ckpt/a", 30002, python="py", device="cuda", weight_version="v",
                               gpus=["4", "5", "6", "7"])
    joined = " ".join(argv)
    assert "--tp-size 2 --dp-size 2 --mem-fraction-static 0.7" in joined and "--device" not in argv
    assert env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"} and "--schedule-policy lpm" in joined
    r = router_command(gpu, "sglang-router", 30000, ["http://a:1", "http://b:2"], 29999, 60.0)
    assert r[:2] == ["sglang-router", "launch"] and r[r.index("--policy") + 1] == "cache_aware"
    assert r[r.index("--worker-urls") + 1:r.index("--worker-urls") + 3] == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="servers must be >= 1, got 0"):
        BackendConfig("sglang", servers=0)
    with pytest.raises(ValueError, match=r"device must be one of auto \| cpu \| cuda, got .tpu."):
        BackendConfig("sglang", device="tpu")
    with pytest.raises(ValueError, match="list of strings"):
        BackendConfig("sglang", server_args="--foo 1")


def test_checkpoint_version_and_same_model(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 10)
    v1 = checkpoint_version(d)
    assert v1.startswith("ckpt@") and checkpoint_version(d) == v1
    time.sleep(0.01)
    (d / "model.safetensors").write_bytes(b"y" * 11)
    assert checkpoint_version(d) != v1
    (tmp_path / "link").symlink_to(d)
    assert same_model(str(tmp_path / "link"), str(d) + "/") and not same_model(str(d), str(tmp_path))


def test_managed_process_stop_kills_the_whole_group(tmp_path):
    """A program that forks a grandchild: stop() returns only when both are gone; SIGTERM is ignored
    by the program, so this also covers the SIGKILL escalation."""
    script = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "c = subprocess.Popen(['sleep', '600']); print('pid=%d;' % c.pid, flush=True); time.sleep(600)")
    p = ManagedProcess("prog", [sys.executable, "-c", script], {}, tmp_path / "p.log", "http://x")
    p.start()
    deadline = time.monotonic() + 20
    while "pid=" not in p.log_tail().split("\n", 2)[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(p.log_tail().split("\n", 2)[-1].split("pid=")[1].split(";")[0])
    assert os.getpgid(child) == p.pgid != os.getpgid(0)        # own session / group, with its child
    t0 = time.monotonic()
    p.stop(grace_s=0.5)
    assert time.monotonic() - t0 < 20 and p.gone() and not _group_members(p.pgid)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def test_start_failures_carry_the_log_tail(fake_python, models, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SGLANG_EXIT", "3")
    with pytest.raises(FleetError, match=r"(?s)exited before it was healthy.*code 3.*failing on purpose"):
        Fleet(_cfg(fake_python, tmp_path)).start(models[0])
    monkeypatch.delenv("FAKE_SGLANG_EXIT")
    monkeypatch.setenv("FAKE_SGLANG_DELAY", "30")
    fleet = Fleet(_cfg(fake_python, tmp_path, launch_timeout_s=1.5))
    with pytest.raises(FleetError, match=r"(?s)not healthy within the time limit.*fake sglang server: -m"):
        fleet.start(models[0])
    assert fleet.servers == []                                   # everything stopped again
    with pytest.raises(FleetError, match="does not exist"):
        Fleet(_cfg("/nonexistent/python", tmp_path)).start(models[0])


def test_launch_serve_swap_mismatch_and_stop(fake_python, models, tmp_path):
    a, b = models
    cfg = _cfg(fake_python, tmp_path)
    fleet = Fleet(cfg).start(a)
    try:
        (s,) = fleet.servers
        pgid = s.pgid
        served = fleet.ensure_serving(a)
        assert served.model_path == a and served.weight_version == checkpoint_version(a)
        with pytest.raises(ModelMismatch) as e:
            fleet.ensure_serving(b, swap_weights=False)
        assert a in str(e.value) and b in str(e.value) and "swap_weights=true" in str(e.value)
        flushes = httpx.get(f"{s.url}/get_server_info").json()["flushes"]
        swapped = fleet.ensure_serving(b, swap_weights=True)
        info = httpx.get(f"{s.url}/get_server_info").json()
        assert swapped.model_path == b and swapped.weight_version == checkpoint_version(b)
        assert info["model_path"] == b and info["flushes"] == flushes + 1
        assert fleet.model_path == b                               # a restart would load b
        fleet.check_serving()
        httpx.post(f"{s.url}/update_weight_version", json={"new_version": "other"})
        with pytest.raises(ServedModelChanged, match="weight_version other"):
            fleet.check_serving()
    finally:
        fleet.stop()
    assert not _group_members(pgid) and fleet.servers == []


def test_backend_refuses_mismatch_before_any_request(fake_python, models, tmp_path):
    """make_backend (what the stages call) with launch=True serving A, asked for B without swap: the
    error names both and the launched servers are stopped again; with swap it serves B."""
    a, b = models
    fleet = Fleet(_cfg(fake_python, tmp_path)).start(a)
    try:
        ext = BackendConfig("sglang", url=fleet.url, launch_timeout_s=10)
        with pytest.raises(ModelMismatch, match=f"(?s){b}.*serves {a}"):
            make_backend(ext, b)
        assert httpx.get(f"{fleet.url}/get_server_info").json()["generates"] == 0
        with serving(BackendConfig("sglang", url=fleet.url, swap_weights=True), b) as be:
            assert isinstance(be, FleetBackend) and be.served_model.as_dict() == {
                "model_path": b, "weight_version": checkpoint_version(b)}
            (res,) = be.generate([GenRequest([1, 2, 3], SamplingParams(n=2, max_new_tokens=3))])
            assert [x["output_ids"][:2] for x in res] == [[3, 0], [3, 1]]
    finally:
        fleet.stop()
    own = _cfg(fake_python, tmp_path)
    with pytest.raises(ModelMismatch):
        with serving(own, a) as be:
            pgid = be.fleet.servers[0].pgid
            be.fleet.ensure_serving(b, swap_weights=False)
    assert not _group_members(pgid)                               # stopped on the way out


def test_killed_server_is_restarted_and_the_request_retried(fake_python, models, tmp_path):
    a, b = models
    cfg = _cfg(fake_python, tmp_path, swap_weights=True, max_retries=1)
    with Fleet(cfg).start(a) as fleet:
        fleet.ensure_serving(b)                 # the restart must come back serving b, not the launch model
        with serving(cfg, b, fleet=fleet) as be:
            be.cfg.backoff_s = 0.05
            (s,) = fleet.servers
            old_pgid = s.pgid
            os.killpg(old_pgid, signal.SIGKILL)
            (res,) = be.generate([GenRequest([1, 2], SamplingParams(n=1, max_new_tokens=3))])
            assert res[0]["meta_info"]["weight_version"] == checkpoint_version(b)
            assert fleet.restarts == 1 and be.recoveries == 1 and s.pgid != old_pgid and s.starts == 2
            assert not _group_members(old_pgid)
            assert httpx.get(f"{s.url}/get_model_info").json()["model_path"] == b
            assert "start 1:" in s.log_tail()                     # one log, appended
            # a weight version changed behind the stage's back: refused at the next response
            httpx.post(f"{s.url}/update_weight_version", json={"new_version": "changed"})
            with pytest.raises(ServedModelChanged, match="changed weights mid-stage"):
                be.generate([GenRequest([1, 2], SamplingParams())])
            httpx.post(f"{s.url}/update_weight_version", json={"new_version": fleet.expected.weight_version})
        assert fleet.servers                                      # a fleet passed in is not stopped
    assert fleet.servers == []


def test_failing_requests_recover_through_the_fleet(fake_python, models, tmp_path, monkeypatch):
    """5xx after all retries: the client calls the fleet's recover() once for the requests that failed
    together (nothing died: it checks health and the served model), then retries them."""
    monkeypatch.setenv("FAKE_SGLANG_FAIL_FIRST", "4")
    with serving(_cfg(fake_python, tmp_path, max_retries=1, concurrency=2), models[0]) as be:
        be.cfg.backoff_s = 0.05
        out = be.generate([GenRequest([1] * k, SamplingParams()) for k in (1, 2)])
        assert [r[0]["output_ids"][0] for r in out] == [1, 2]
        assert be.recoveries == 1 and be.retries == 2 and be.fleet.restarts == 0


def test_unrecoverable_server_raises_so_the_stage_stops(fake_python, models, tmp_path, monkeypatch):
    a, _ = models
    cfg = _cfg(fake_python, tmp_path, max_retries=0, recover_timeout_s=3)
    be = make_backend(cfg, a)
    try:
        be.cfg.backoff_s = 0.01
        monkeypatch.setenv("FAKE_SGLANG_EXIT", "7")             # the restart fails too
        os.killpg(be.fleet.servers[0].pgid, signal.SIGKILL)
        with pytest.raises(SGLangError, match=r"(?s)recovering the server failed.*exited before it was healthy"):
            be.generate([GenRequest([1], SamplingParams())])
    finally:
        be.close()
    assert be.fleet.servers == []


@pytest.mark.skipif(ROUTER_BIN is None, reason="sglang-router is not installed (the dev extra)")
def test_two_launched_servers_behind_the_router(fake_python, models, tmp_path, tiny_qwen2):
    """servers=2: a real sglang-router (cache_aware) in front; the fleet lists the router's workers
    for an external client too, and checks/swaps each of them directly."""
    model = str(tiny_qwen2)                  # the router loads the model's tokenizer at registration
    fleet = Fleet(_cfg(fake_python, tmp_path, servers=2, router_path=ROUTER_BIN, launch_timeout_s=120)).start(model)
    try:
        assert fleet.router is not None and len(fleet.servers) == 2
        assert fleet.url not in fleet.worker_urls()
        ext = Fleet(BackendConfig("sglang", url=fleet.url))
        assert sorted(ext.worker_urls()) == sorted(s.url for s in fleet.servers)
        assert ext.ensure_serving(model).weight_version == checkpoint_version(model)
        with serving(BackendConfig("sglang", url=fleet.url), model) as be:
            out = be.generate([GenRequest([1] * k, SamplingParams(n=3)) for k in range(1, 9)])
        assert [[x["output_ids"][:2] for x in r] for r in out] == [[[k, i] for i in range(3)] for k in range(1, 9)]
        counts = [httpx.get(f"{s.url}/get_server_info").json()["generates"] for s in fleet.servers]
        assert sum(counts) == 8
        pgids = [fleet.router.pgid] + [s.pgid for s in fleet.servers]
    finally:
        fleet.stop()
    assert not any(_group_members(g) for g in pgids)


def test_free_ports_are_distinct():
    ports = free_ports("127.0.0.1", 5)
    assert len(set(ports)) == 5


def test_preflight(fake_python, models, tmp_path):
    a, b = models
    with pytest.raises(FleetError, match="cannot import sglang"):      # the fake 'python' has no sglang
        Fleet(_cfg(fake_python, tmp_path)).preflight(a)
    with Fleet(_cfg(fake_python, tmp_path)).start(a) as fleet:
        url = fleet.url
        ext = Fleet(BackendConfig("sglang", url=url))
        ext.preflight(a)
        with pytest.raises(ModelMismatch, match=f"serves {a}"):
            ext.preflight(b)
        Fleet(BackendConfig("sglang", url=fleet.url, swap_weights=True)).preflight(b)
    with pytest.raises(FleetError, match="not healthy"):
        Fleet(BackendConfig("sglang", url=url)).preflight(a)           # nothing listens there now


def _load_standin(name: str, alias: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "sglang_cpu" / name / "__init__.py"
    spec = importlib.util.spec_from_file_location(alias, path, submodule_search_locations=[])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sgl_kernel_standin_matches_the_reference_loop():
    import torch

    k = _load_standin("sgl_kernel", "sgl_kernel_standin_under_test")
    g = torch.Generator().manual_seed(0)
    for idx_dtype in (torch.int32, torch.int64):
        bs, pool_len, num_reqs = 6, 40, 9
        req_pool_indices = torch.randperm(num_reqs, generator=g)[:bs].to(idx_dtype)
        start = torch.randint(0, 20, (bs,), generator=g).to(idx_dtype)
        lens = torch.randint(0, 15, (bs,), generator=g).to(idx_dtype)
        lens[2] = 0                                                     # an empty request
        end = start + lens
        out_cache_loc = torch.randperm(4096, generator=g)[:int(lens.sum())].to(torch.int64)
        got = torch.full((num_reqs, pool_len), -1, dtype=torch.int32)
        ref = got.clone()
        k.assign_req_to_token_pool_cpu(req_pool_indices, got, start, end, out_cache_loc, pool_len)
        off = 0
        for i in range(bs):                                             # the note's definition
            n = int(end[i] - start[i])
            ref[int(req_pool_indices[i]), int(start[i]):int(end[i])] = out_cache_loc[off:off + n].to(torch.int32)
            off += n
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="pool_len"):
        k.assign_req_to_token_pool_cpu(req_pool_indices, got, start, end, out_cache_loc, pool_len + 1)
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.fused_add_rmsnorm\(\) was called"):
        k.fused_add_rmsnorm(None)
    from_import = k.__getattr__("decode_attention_cpu")               # what `from sgl_kernel import x` gets
    assert from_import.__name__ == "decode_attention_cpu" and k.STANDIN


def test_torchvision_standin_is_inert():
    import importlib

    tv = _load_standin("torchvision", "torchvision_standin_under_test")
    try:
        F = importlib.import_module("torchvision_standin_under_test.transforms.functional")
        mode = tv.transforms.InterpolationMode.BICUBIC
        assert F.pil_to_tensor(object()) is not None and mode is not None

        class T(tv.transforms.Transform):                             # subclassable
            pass

        assert T()(1, 2) is not None
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "torchvision_standin_under_test"]


def test_a_port_taken_before_the_server_binds_is_replaced(fake_python, models, tmp_path, monkeypatch):
    """port: 0 picks free ports, but another program can take one before the server binds it: the server
    logs ``[Errno 98]``; the fleet restarts it on a new free port (the fleet's URL follows)."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken, real, calls = blocker.getsockname()[1], fleet_mod.free_ports, []

    def first_one_taken(host, n):
        calls.append(n)
        return [taken] if len(calls) == 1 else real(host, n)

    monkeypatch.setattr(fleet_mod, "free_ports", first_one_taken)
    try:
        with Fleet(_cfg(fake_python, tmp_path)).start(models[0]) as fleet:
            (s,) = fleet.servers
            assert s.starts == 2 and fleet.url == s.url and not s.url.endswith(f":{taken}")
            assert httpx.get(f"{fleet.url}/health").status_code == 200 and "[Errno 98]" not in s.log_tail()
    finally:
        blocker.close()
