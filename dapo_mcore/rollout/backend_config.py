"""Where samples come from: the ``backend`` section of every rollout stage (generate, mc, eval)."""
from __future__ import annotations

from dataclasses import dataclass

from dapo_mcore.config import option


@dataclass
class BackendConfig:
    """``kind``: ``"embedded"`` (in-process engine, the default without a GPU) or ``"sglang"`` (HTTP to
    SGLang servers, directly or behind ``sglang-router``; :mod:`dapo_mcore.rollout.fleet`).

    With ``kind: sglang`` every server (behind a router: every worker) is asked what it serves
    (``/get_model_info``) before the first request. ``launch: true`` starts ``servers`` servers for the
    stage's model (each ``tp`` x ``dp`` devices; on ``host`` at ``port`` — the router, or the single
    server — and ``port+1 .. port+servers`` behind one ``sglang-router --policy cache_aware`` when
    ``servers > 1``; ``port: 0`` picks free ports) and stops them when the stage ends, waiting until their
    processes are gone; ``launch: false`` uses the external fleet at ``url``. ``swap_weights: true`` swaps
    a server that serves another model to the stage's (``/update_weights_from_disk``, then
    ``/flush_cache``); ``false`` makes that an error naming both models."""

    kind: str = option("embedded", "embedded (in-process engine) | sglang (HTTP server or router)")
    prefix_reuse: bool = option(True, "embedded: reuse cached prefix KV (radix cache across states)", identity=False)
    max_batch_rows: int = option(256, "embedded: sequences decoded at once", identity=False)
    radix_cache_bytes: int = option(1 << 30, "embedded: bound of the cross-request radix prefix cache (KV bytes; "
                                    "0: share a prefix only among one request's samples)", identity=False)
    dtype: str = option("float32", "embedded: compute dtype")
    url: str = option("http://127.0.0.1:30000", "sglang, launch: false: server or router address", identity=False)
    concurrency: int = option(32, "sglang: requests in flight", identity=False)
    timeout_s: float = option(600.0, "sglang: seconds per request", identity=False)
    max_retries: int = option(5, "sglang: retries of a failed request", identity=False)
    launch: bool = option(False, "sglang: start (and afterwards stop) the servers for the stage's model",
                          identity=False)
    swap_weights: bool = option(False, "sglang: swap a server serving another model to the stage's model "
                                "(else: an error)", identity=False)
    servers: int = option(1, "sglang, launch: number of servers (a cache_aware router in front when > 1)",
                          identity=False)
    tp: int = option(1, "sglang, launch: tensor-parallel GPUs per server", identity=False)
    dp: int = option(1, "sglang, launch: data-parallel replicas per server", identity=False)
    host: str = option("127.0.0.1", "sglang, launch: host to bind", identity=False)
    port: int = option(30000, "sglang, launch: router (or single server) port; servers on the next ones; "
                       "0 picks free ports", identity=False)
    device: str = option("auto", "sglang, launch: auto (cuda when torch sees a GPU) | cpu | cuda", identity=False)
    mem_fraction_static: float = option(0.85, "sglang, launch on GPU: --mem-fraction-static", identity=False)
    server_args: list[str] = option(factory=list, doc="sglang, launch: extra sglang.launch_server arguments",
                                    identity=False)
    python: str = option("", "sglang, launch: interpreter with SGLang (default: $DAPO_SGLANG_VENV, else "
                         "the repo's .venv-sglang, else this one)", identity=False)
    router_path: str = option("", "sglang, launch: sglang-router executable (default: beside python, then PATH)",
                              identity=False)
    launch_timeout_s: float = option(900.0, "sglang, launch: bound on servers and router becoming healthy",
                                     identity=False)
    recover_timeout_s: float = option(300.0, "sglang: bound on the fleet becoming healthy again after a server "
                                      "died mid-stage (a launched server is restarted)", identity=False)
    max_recoveries: int = option(2, "sglang: recoveries per request before the stage stops", identity=False)
    stop_grace_s: float = option(30.0, "sglang, launch: seconds from SIGTERM to SIGKILL", identity=False)
    log_dir: str = option("", "sglang, launch: server and router logs (default: a new temporary directory)",
                          identity=False)

    def __post_init__(self):
        if self.kind not in ("embedded", "sglang"):
            raise ValueError(f"backend kind must be 'embedded' or 'sglang', got {self.kind!r}")
        if self.radix_cache_bytes < 0:
            raise ValueError(f"backend.radix_cache_bytes must be >= 0, got {self.radix_cache_bytes}")
        for name in ("servers", "tp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"backend.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535 - self.servers:
            raise ValueError(f"backend.port must be in [0, {65535 - self.servers}], got {self.port}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"backend.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"backend.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if isinstance(self.server_args, str):
            raise ValueError("backend.server_args must be a list of strings, e.g. [--context-length, '4096']")
