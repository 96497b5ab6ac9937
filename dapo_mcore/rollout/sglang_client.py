"""HTTP client for SGLang's ``/generate`` (one server or an ``sglang-router``), with httpx.

- every request carries one prompt and all its ``n`` samples, so they land on one server and
  share its radix (prefix) cache;
- ``temperature``/``top_p``/``top_k`` are always sent explicitly;
- concurrency limit (a thread pool of ``concurrency`` in-flight requests), per-request timeout,
  retries with exponential backoff on connection errors, timeouts and 5xx; a 4xx is an error in
  the request and raised at once;
- :meth:`SGLangClient.wait_healthy` polls ``GET /health`` until the server answers 200.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from dapo_mcore.rollout.backend import GenRequest


class SGLangError(RuntimeError):
    """The server rejected a request or stayed unreachable after all retries."""


@dataclass
class SGLangClientConfig:
    url: str = "http://127.0.0.1:30000"
    concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 0.5           # first retry delay; doubles each retry
    health_timeout_s: float = 600.0  # wait_healthy() limit


class SGLangClient:
    """Generation backend over HTTP (see module doc)."""

    def __init__(self, cfg: SGLangClientConfig, wait: bool = True):
        self.cfg = cfg
        self.http = httpx.Client(base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency,
                                                     max_keepalive_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency)
        self.retries = 0
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.health_timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                r = self.http.get("/health", timeout=5.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.2)
        raise SGLangError(f"{self.cfg.url}/health not healthy after {self.cfg.health_timeout_s} s (last: {last})")

    def _post(self, path: str, payload: dict) -> Any:
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = self.http.post(path, json=payload)
                if r.status_code < 400:
                    return r.json()
                if r.status_code < 500:
                    raise SGLangError(f"{self.cfg.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
                err = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.TransportError as e:  # connect/read/write errors and timeouts
                err = repr(e)
            if attempt == self.cfg.max_retries:
                raise SGLangError(f"{self.cfg.url}{path}: failed after {attempt + 1} attempts ({err})")
            self.retries += 1
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def payload(req: GenRequest) -> dict:
        p = {"input_ids": list(req.input_ids), "sampling_params": req.params.to_sglang()}
        if req.rid:
            p["rid"] = req.rid
        if req.return_logprob:
            p["return_logprob"] = True
            p["top_logprobs_num"] = req.top_logprobs_num
        return p

    def _one(self, req: GenRequest) -> list[dict]:
        if req.params.n > 1 and req.rid:
            # SGLang expands n samples into n sub-requests; a fixed rid would collide.
            req = GenRequest(req.input_ids, req.params, "", req.return_logprob, req.top_logprobs_num)
        res = self._post("/generate", self.payload(req))
        res = res if isinstance(res, list) else [res]
        if len(res) != req.params.n:
            raise SGLangError(f"{self.cfg.url}/generate: asked for n={req.params.n} samples, got {len(res)}")
        return res

    def generate(self, requests: list[GenRequest]) -> list[list[dict]]:
        return list(self.pool.map(self._one, requests))

    def flush_cache(self) -> None:
        r = self.http.post("/flush_cache")
        if r.status_code != 200:
            raise SGLangError(f"{self.cfg.url}/flush_cache: HTTP {r.status_code}: {r.text[:200]}")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()
