"""A stand-in for ``python -m sglang.launch_server`` in the fast fleet tests (tests/test_rollout_fleet.py):
answers SGLang 0.5.23's routes that the fleet and client use, in SGLang's shapes, without a model.

Run as ``sglang_fake_server.py -m sglang.launch_server --model-path M --host H --port P
--weight-version V [other SGLang flags, ignored]``. ``/generate`` returns ``n`` samples whose
``output_ids`` are ``[len(input_ids), sample index, hash of the model path % 1000]`` and whose
``meta_info.weight_version`` is the current one. ``/update_weights_from_disk`` and
``/update_weight_version`` change the model/version; ``/get_server_info`` counts flushes and
generate calls. It starts one child process (``sleep``) so group stops can be checked.
Environment: ``FAKE_SGLANG_ENGINE=1`` answers ``/generate`` with the embedded engine on the current model
(real samples from a real checkpoint, reloaded at each weight update; the pipeline tests run stages on it);
``FAKE_SGLANG_EXIT=CODE`` prints a line and exits at once; ``FAKE_SGLANG_DELAY=S`` waits
S seconds before listening (a slow start); ``FAKE_SGLANG_FAIL_FIRST=K`` answers the first K
``/generate`` with HTTP 503.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"model_path": "", "weight_version": "default", "flushes": 0, "generates": 0, "launch_model": ""}
ENGINE: dict = {}      # FAKE_SGLANG_ENGINE=1: {"engine": EmbeddedEngine of STATE["model_path"], "lock": Lock}


def _load_engine() -> None:
    from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig

    ENGINE["engine"] = EmbeddedEngine(EngineConfig(STATE["model_path"]))


def _engine_generate(body: dict) -> list[dict]:
    from dapo_mcore.rollout.backend import GenRequest, SamplingParams

    req = GenRequest(body["input_ids"], SamplingParams.from_sglang(body.get("sampling_params") or {}),
                     return_logprob=bool(body.get("return_logprob")), top_logprobs_num=body.get("top_logprobs_num", 0))
    with ENGINE["lock"]:
        out = ENGINE["engine"].generate([req])[0]
    for x in out:
        x["meta_info"]["weight_version"] = STATE["weight_version"]
    return out


def _model_hash() -> int:
    return int(hashlib.sha1(STATE["model_path"].encode()).hexdigest()[:8], 16) % 1000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path}", flush=True)

    def _send(self, code: int, obj) -> None:
        data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _info(self) -> dict:
        return {"model_path": STATE["model_path"], "tokenizer_path": STATE["launch_model"],
                "weight_version": STATE["weight_version"], "is_generation": True}

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            return self._send(200, "")
        if path in ("/get_model_info", "/model_info"):
            return self._send(200, self._info())
        if path in ("/get_server_info", "/server_info"):
            return self._send(200, {"version": "fake", "flushes": STATE["flushes"], "generates": STATE["generates"],
                                    "pid": os.getpid(), **self._info()})
        self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        path = self.path.split("?")[0]
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}") if n else {}
        if path == "/flush_cache":
            STATE["flushes"] += 1
            return self._send(200, "Cache flushed.")
        if path == "/update_weights_from_disk":
            STATE["model_path"] = body["model_path"]
            if ENGINE:
                with ENGINE["lock"]:
                    _load_engine()
            if body.get("weight_version") is not None:
                STATE["weight_version"] = body["weight_version"]
            return self._send(200, {"success": True, "message": "ok", "num_paused_requests": 0})
        if path == "/update_weight_version":
            STATE["weight_version"] = body["new_version"]
            return self._send(200, {"success": True})
        if path == "/generate":
            STATE["generates"] += 1
            if STATE["generates"] <= int(os.environ.get("FAKE_SGLANG_FAIL_FIRST", "0")):
                return self._send(503, {"error": {"message": "overloaded (FAKE_SGLANG_FAIL_FIRST)"}})
            ids, sp = body["input_ids"], body.get("sampling_params") or {}
            if ENGINE:
                out = _engine_generate(body)
                return self._send(200, out if len(out) > 1 else out[0])
            out = [{"text": f"s{i}", "output_ids": [len(ids), i, _model_hash()],
                    "meta_info": {"prompt_tokens": len(ids), "completion_tokens": 3, "cached_tokens": len(ids) - 1,
                                  "weight_version": STATE["weight_version"],
                                  "finish_reason": {"type": "length", "length": 3}}}
                   for i in range(int(sp.get("n", 1)))]
            return self._send(200, out if len(out) > 1 else out[0])
        self._send(404, {"detail": "Not Found"})


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["-m", "sglang.launch_server"]:
        argv = argv[2:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--weight-version", default="default")
    a, _ = ap.parse_known_args(argv)
    print(f"fake sglang server: {' '.join(sys.argv[1:])}", flush=True)
    if os.environ.get("FAKE_SGLANG_EXIT"):
        print("fake sglang server: failing on purpose (FAKE_SGLANG_EXIT)", flush=True)
        sys.exit(int(os.environ["FAKE_SGLANG_EXIT"]))
    time.sleep(float(os.environ.get("FAKE_SGLANG_DELAY", "0")))
    STATE.update(model_path=a.model_path, launch_model=a.model_path, weight_version=a.weight_version)
    if os.environ.get("FAKE_SGLANG_ENGINE") == "1":
        import threading

        import torch

        torch.set_num_threads(1)
        ENGINE["lock"] = threading.Lock()
        _load_engine()
    child = subprocess.Popen(["sleep", "3600"])  # a child in the same process group
    print(f"child pid {child.pid}", flush=True)
    httpd = ThreadingHTTPServer((a.host, a.port), Handler)
    httpd.daemon_threads = True
    print("The server is fired up and ready to roll!", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
