"""SGLang client <-> in-process SGLang-compatible server, end-to-end with real generation."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from dapo_mcore.data.shards import iter_records
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.common import BackendConfig
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig
from dapo_mcore.generate.stage import GenerateConfig, run_generate
from dapo_mcore.mc.stage import MCConfig, run_mc
from dapo_mcore.rollout.server import EmbeddedServer
from dapo_mcore.rollout.sglang_client import SGLangClient, SGLangClientConfig, SGLangError
from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems
from dapo_mcore.tasks.chain import make_problems

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return build_toy_completer(tmp_path_factory.getbasetemp() / "toy_completer", steps=100)


@pytest.fixture(scope="module")
def engine(toy):
    return EmbeddedEngine(EngineConfig(str(toy)))


@pytest.fixture(scope="module")
def server(engine):
    with EmbeddedServer(engine) as srv:
        yield srv


def test_routes_and_schema(server, engine):
    http = httpx.Client(base_url=server.url, timeout=60)
    assert http.get("/health").status_code == 200
    for route in ("/get_model_info", "/model_info"):
        assert http.get(route).json()["model_path"] == engine.cfg.model_path
    for route in ("/get_server_info", "/server_info"):
        assert "version" in http.get(route).json()
    assert http.post("/flush_cache").status_code == 200 and http.get("/flush_cache").status_code == 200
    ids = engine.tokenizer(make_problems(1, seed=2)[0].prompt)["input_ids"]
    one = http.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
    assert isinstance(one, dict) and set(one) == {"text", "output_ids", "meta_info"}
    m = one["meta_info"]
    assert m["prompt_tokens"] == len(ids) and m["completion_tokens"] == len(one["output_ids"]) == 5
    assert m["finish_reason"] == {"type": "length", "length": 5}
    many = http.post("/generate", json={"input_ids": [ids, ids[:-1]], "sampling_params": {
        "max_new_tokens": 4, "temperature": 1.0, "n": 3, "sampling_seed": 1}}).json()
    assert isinstance(many, list) and len(many) == 6                   # flat, grouped by prompt
    assert [x["meta_info"]["prompt_tokens"] for x in many] == [len(ids)] * 3 + [len(ids) - 1] * 3
    # the first request stored ids[:-1] in the radix cache: every sample reuses it; after a flush, cold again
    assert [x["meta_info"]["cached_tokens"] for x in many[:3]] == [len(ids) - 1] * 3
    assert http.post("/flush_cache").status_code == 200
    again = http.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "n": 3}}).json()
    assert [x["meta_info"]["cached_tokens"] for x in again] == [0, len(ids) - 1, len(ids) - 1]
    txt = http.post("/generate", json={"text": "47:+8\n", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}).json()
    assert txt["meta_info"]["prompt_tokens"] == len(engine.tokenizer("47:+8\n")["input_ids"])
    for bad in ({"sampling_params": {}}, {"input_ids": []}, {"input_ids": [1], "sampling_params": {"top_p": 0}},
                {"input_ids": [[1], [2]], "sampling_params": [{"n": 1}, {"n": 2}]}):
        r = http.post("/generate", json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"]
    assert http.get("/nope").status_code == 404


def test_client_equals_in_process_engine(server, engine):
    """Same requests, same seeds: HTTP (concurrent, server-side batching) == direct engine call."""
    client = SGLangClient(SGLangClientConfig(server.url, concurrency=4))
    ids = [engine.tokenizer(p.prompt)["input_ids"] for p in make_problems(6, seed=4)]
    reqs = [GenRequest(x, SamplingParams(max_new_tokens=12, temperature=1.0, n=4, sampling_seed=i), rid=f"r{i}")
            for i, x in enumerate(ids)]
    via_http = client.generate(reqs)
    direct = engine.generate(reqs)
    for a, b in zip(via_http, direct):
        assert [s["output_ids"] for s in a] == [s["output_ids"] for s in b]
        assert [s["text"] for s in a] == [s["text"] for s in b]
    client.close()


def test_payload_is_explicit():
    p = SGLangClient.payload(GenRequest([1, 2], SamplingParams(n=4, sampling_seed=3), rid="s"))
    sp = p["sampling_params"]
    assert {"temperature", "top_p", "top_k", "max_new_tokens", "n", "stop"} <= set(sp)
    assert sp["n"] == 4 and p["input_ids"] == [1, 2]


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fails`` POSTs, then a fixed sample; 400 for rid 'bad'."""

    fails = 2
    posts = 0

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts += 1
        if body.get("rid") == "bad":
            return self._send(400, {"error": {"message": "bad request"}})
        if type(self).posts <= type(self).fails:
            return self._send(503, {"error": {"message": "overloaded"}})
        self._send(200, {"text": "x", "output_ids": [5], "meta_info": {"prompt_tokens": 2, "completion_tokens": 1,
                                                                       "cached_tokens": 0, "finish_reason": {"type": "length", "length": 1}}})


def test_retries_backoff_and_errors():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        c = SGLangClient(SGLangClientConfig(url, concurrency=1, max_retries=3, backoff_s=0.01))
        (res,), = c.generate([GenRequest([1, 2], SamplingParams(max_new_tokens=1))])
        assert res["output_ids"] == [5] and c.retries == 2
        with pytest.raises(SGLangError, match="HTTP 400"):
            c.generate([GenRequest([1, 2], SamplingParams(), rid="bad")])
        _Flaky.posts, _Flaky.fails = 0, 100
        with pytest.raises(SGLangError, match="failed after 2 attempts"):
            SGLangClient(SGLangClientConfig(url, max_retries=1, backoff_s=0.01)).generate(
                [GenRequest([1], SamplingParams())])
        with pytest.raises(SGLangError, match="asked for n=2"):
            _Flaky.posts, _Flaky.fails = 0, 0
            c.generate([GenRequest([1], SamplingParams(n=2))])
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(SGLangError, match="not healthy"):     # connection refused on a closed port
        SGLangClient(SGLangClientConfig(url, health_timeout_s=0.5))


def test_stages_through_http_equal_embedded(toy, server, tmp_path):
    """generate + mc with backend=sglang against the server write the same records as in-process."""
    probs = write_chain_problems(tmp_path / "p.jsonl", 3, seed=8)
    common = dict(num_samples=4, keep=2, max_new_tokens=32, shard_size=2, show_progress=False)
    run_generate(GenerateConfig(str(probs), str(toy), **common), tmp_path / "g_emb")
    run_generate(GenerateConfig(str(probs), str(toy), backend=BackendConfig("sglang", url=server.url, concurrency=4),
                                **common), tmp_path / "g_http")
    assert list(iter_records(tmp_path / "g_emb")) == list(iter_records(tmp_path / "g_http"))
    mc = dict(num_completions=3, max_new_tokens=24, shard_size=4, batch_requests=4, show_progress=False)
    s = run_mc(MCConfig(str(toy), backend=BackendConfig("sglang", url=server.url, concurrency=4), **mc),
               tmp_path / "g_emb", tmp_path / "mc_http")
    run_mc(MCConfig(str(toy), **mc), tmp_path / "g_emb", tmp_path / "mc_emb")
    assert list(iter_records(tmp_path / "mc_emb")) == list(iter_records(tmp_path / "mc_http"))
    assert s["throughput"]["cache_hit_rate"] > 0.3 and s["throughput"]["samples"] > 0
