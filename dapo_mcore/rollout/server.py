"""An in-process HTTP server exposing :class:`EmbeddedEngine` under SGLang's routes, so the SGLang
client (and ``sglang-router``) can be exercised end-to-end with real generation on a CPU.

Routes: ``POST /generate`` (``input_ids`` or ``text``, single or batch; ``sampling_params`` dict
or list; ``return_logprob``, ``top_logprobs_num``, ``rid``), ``GET /health``, ``GET|POST
/flush_cache``, ``GET /get_model_info`` (alias ``/model_info``), ``GET /get_server_info`` (alias
``/server_info``). Concurrent ``/generate`` requests are gathered for ``batch_window_s`` and run
as one engine batch (up to ``max_batch_requests``).

Request log: every answered ``/generate`` is recorded as ``{"seq", "prompts", "n", "samples"}``
(``prompts``: :func:`prompt_key` of each prompt; ``samples``: samples returned) in a bounded
``request_log``; ``/get_server_info`` reports it with ``requests_served``, so a test (or an
operator) can see from the server's side which prompts, and how many of their samples, it served,
e.g. behind ``sglang-router``.

``python -m dapo_mcore.rollout.server --model PATH --port P`` serves until interrupted.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import queue
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig


def prompt_key(input_ids: list[int]) -> str:
    """Short stable id of one prompt's token ids (16 hex chars of a SHA-1) for the request log."""
    return hashlib.sha1(",".join(map(str, input_ids)).encode()).hexdigest()[:16]


class _Job:
    def __init__(self, reqs: list[GenRequest]):
        self.reqs, self.done, self.result, self.error = reqs, threading.Event(), None, None


class EmbeddedServer:
    """Serve ``engine`` on ``host:port`` (``port=0``: a free port) from a background thread.
    ``request_log_size``: how many of the latest ``/generate`` requests ``request_log`` keeps."""

    def __init__(self, engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                 batch_window_s: float = 0.005, max_batch_requests: int = 64, request_log_size: int = 4096):
        self.engine, self.batch_window_s, self.max_batch_requests = engine, batch_window_s, max_batch_requests
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.requests_served = 0
        self._log: collections.deque[dict] = collections.deque(maxlen=request_log_size)
        self._log_lock = threading.Lock()
        self._threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._batch_loop, daemon=True)]

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "EmbeddedServer":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)

    @property
    def request_log(self) -> list[dict]:
        """The latest answered ``/generate`` requests, oldest first (see module doc)."""
        with self._log_lock:
            return list(self._log)

    def _record(self, reqs: list[GenRequest], samples: int) -> None:
        with self._log_lock:
            self.requests_served += 1
            self._log.append({"seq": self.requests_served, "prompts": [prompt_key(r.input_ids) for r in reqs],
                              "n": reqs[0].params.n, "samples": samples})

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- batching ------------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            n_req = len(job.reqs)
            while n_req < self.max_batch_requests:
                try:
                    nxt = self.jobs.get(timeout=self.batch_window_s)
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
                n_req += len(nxt.reqs)
            flat = [r for j in batch for r in j.reqs]
            try:
                res = self.engine.generate(flat)
                k = 0
                for j in batch:
                    j.result = res[k:k + len(j.reqs)]
                    k += len(j.reqs)
            except Exception as e:  # noqa: BLE001 - report to every waiting request
                for j in batch:
                    j.error = e
            for j in batch:
                j.done.set()

    # -- request parsing -----------------------------------------------------------------------
    def parse_generate(self, body: dict) -> tuple[list[GenRequest], bool]:
        """Requests of a ``/generate`` body and whether it was a batch."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        if "input_ids" in body and body["input_ids"] is not None:
            ids = body["input_ids"]
        elif "text" in body and body["text"] is not None:
            t = body["text"]
            enc = lambda s: self.engine.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
            ids = [enc(s) for s in t] if isinstance(t, list) else enc(t)
        else:
            raise ValueError("one of 'input_ids' or 'text' is required")
        batched = bool(ids) and isinstance(ids[0], list)
        seqs = ids if batched else [ids]
        if not all(isinstance(s, list) and s and all(isinstance(x, int) for x in s) for s in seqs):
            raise ValueError("input_ids must be a non-empty list of ints or a list of such lists")
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * len(seqs)
        if len(sps) != len(seqs):
            raise ValueError(f"{len(sps)} sampling_params for {len(seqs)} prompts")
        params = [SamplingParams.from_sglang(p) for p in sps]
        if len({p.n for p in params}) > 1:
            raise ValueError("'n' must be equal in every entry of sampling_params")
        rid = body.get("rid") or ""
        reqs = [GenRequest(s, p, rid if isinstance(rid, str) else "", bool(body.get("return_logprob", False)),
                           int(body.get("top_logprobs_num") or 0)) for s, p in zip(seqs, params)]
        return reqs, batched

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj) -> None:
                data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(obj, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _info(self, path: str):
                e = server.engine
                if path in ("/get_model_info", "/model_info"):
                    return {"model_path": e.cfg.model_path, "tokenizer_path": e.cfg.model_path,
                            "is_generation": True, "preferred_sampling_params": None}
                if path in ("/get_server_info", "/server_info"):
                    return {"version": "dapo-mcore-embedded", "model_path": e.cfg.model_path,
                            "engine": asdict(e.cfg), "stats": e.stats.as_dict(),
                            "max_total_num_tokens": e.max_context, "disable_radix_cache": e.radix is None,
                            "requests_served": server.requests_served, "request_log": server.request_log}
                return None

            def do_GET(self):
                path = self.path.split("?")[0]
                if path in ("/health", "/health_generate"):
                    return self._send(200, "")
                if path == "/flush_cache":
                    server.engine.flush_cache()
                    return self._send(200, "Cache flushed.")
                info = self._info(path)
                if info is not None:
                    return self._send(200, info)
                self._send(404, {"error": {"message": f"no route {path}"}})

            def do_POST(self):
                path = self.path.split("?")[0]
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if path == "/flush_cache":
                    server.engine.flush_cache()
                    return self._send(200, "Cache flushed.")
                if path != "/generate":
                    return self._send(404, {"error": {"message": f"no route {path}"}})
                try:
                    reqs, batched = server.parse_generate(json.loads(raw or b"{}"))
                except (ValueError, TypeError, json.JSONDecodeError) as e:
                    return self._send(400, {"error": {"message": str(e)}})
                job = _Job(reqs)
                server.jobs.put(job)
                job.done.wait()
                if job.error is not None:
                    code = 400 if isinstance(job.error, ValueError) else 500
                    return self._send(code, {"error": {"message": str(job.error)}})
                flat = [s for samples in job.result for s in samples]
                server._record(reqs, len(flat))
                self._send(200, flat if (batched or len(flat) > 1) else flat[0])

        return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a HF checkpoint with the embedded engine under SGLang's routes.")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--no-prefix-reuse", action="store_true")
    ap.add_argument("--max-batch-rows", type=int, default=256)
    a = ap.parse_args(argv)
    eng = EmbeddedEngine(EngineConfig(a.model, prefix_reuse=not a.no_prefix_reuse, max_batch_rows=a.max_batch_rows))
    srv = EmbeddedServer(eng, a.host, a.port).start()
    print(f"serving {a.model} at {srv.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
