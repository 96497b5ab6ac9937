"""HTTP client for SGLang's ``/generate`` (one server or an ``sglang-router``), with httpx.

- every request carries one prompt and all its ``n`` samples, so they land on one server and
  share its radix (prefix) cache;
- ``temperature``/``top_p``/``top_k`` are always sent explicitly;
- concurrency limit (a thread pool of ``concurrency`` in-flight requests), per-request timeout,
  retries with exponential backoff on connection errors, timeouts and 5xx; a 4xx is an error in
  the request and raised at once;
- :meth:`SGLangClient.wait_healthy` polls ``GET /health`` until the server answers 200;
- recovery: when a request still fails after its retries (connection errors, timeouts, 5xx), the
  client calls ``recover`` once for all the threads that failed together (by default: wait for
  ``/health`` again, at most ``recover_timeout_s``; a :class:`~dapo_mcore.rollout.fleet.Fleet` passes
  its own, which restarts a server it launched), then retries the request, at most
  ``max_recoveries`` times; then it raises :class:`SGLangError` and the stage stops (its finished
  shards stay; a re-run recomputes the unfinished shard whole: nothing lost or duplicated);
- served weights: with ``expect_weight_version`` set, a response whose ``meta_info.weight_version``
  differs raises :class:`ServedModelChanged` at once (the server changed weights mid-stage).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from dapo_mcore.rollout.backend import GenRequest


class SGLangError(RuntimeError):
    """The server rejected a request or stayed unreachable after all retries."""


class ServedModelChanged(SGLangError):
    """A server answered with other weights than the ones the stage checked at its start."""


@dataclass
class SGLangClientConfig:
    url: str = "http://127.0.0.1:30000"
    concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 0.5           # first retry delay; doubles each retry
    health_timeout_s: float = 600.0  # wait_healthy() limit
    recover_timeout_s: float = 300.0  # default recovery: wait this long for /health again
    max_recoveries: int = 2           # recoveries per request before the error is raised


class SGLangClient:
    """Generation backend over HTTP (see module doc)."""

    def __init__(self, cfg: SGLangClientConfig, wait: bool = True, recover: Callable[[], None] | None = None,
                 expect_weight_version: str | None = None):
        self.cfg = cfg
        self.http = httpx.Client(base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency,
                                                     max_keepalive_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency)
        self.retries = 0
        self.recoveries = 0                  # recoveries run (one per group of requests that failed together)
        self.recover = recover or (lambda: self.wait_healthy(self.cfg.recover_timeout_s))
        self.expect_weight_version = expect_weight_version
        self._recover_lock = threading.Lock()
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        timeout_s = self.cfg.health_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
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
        raise SGLangError(f"{self.cfg.url}/health not healthy after {timeout_s} s (last: {last})")

    def _recover(self, seen: int) -> None:
        """Run ``recover`` once for every request that failed since recovery number ``seen``."""
        with self._recover_lock:
            if self.recoveries == seen:
                self.recover()
                self.recoveries += 1

    def _post(self, path: str, payload: dict) -> Any:
        for round_ in range(self.cfg.max_recoveries + 1):
            seen = self.recoveries
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
                    break
                self.retries += 1
                time.sleep(delay)
                delay *= 2
            msg = (f"{self.cfg.url}{path}: failed after {attempt + 1} attempts ({err})"
                   + (f", after {round_} recover(ies) of the server" if round_ else ""))
            if round_ == self.cfg.max_recoveries:
                raise SGLangError(msg)
            try:
                self._recover(seen)
            except Exception as e:  # noqa: BLE001 - the recovery's reason is the useful part
                raise SGLangError(f"{msg}; recovering the server failed: {e}") from e
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
        if self.expect_weight_version is not None:
            for s in res:
                got = s.get("meta_info", {}).get("weight_version")
                if got is not None and got != self.expect_weight_version:
                    raise ServedModelChanged(
                        f"{self.cfg.url}/generate answered with weight_version {got!r}, but the stage checked "
                        f"{self.expect_weight_version!r} at its start: the server changed weights mid-stage")
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
