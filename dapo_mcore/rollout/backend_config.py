"""Where samples come from: the ``backend`` section of every rollout stage (generate, mc, eval)."""
from __future__ import annotations

from dataclasses import dataclass

from dapo_mcore.config import Checked, option


@dataclass
class BackendConfig(Checked):
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

    kind: str = option("embedded", "embedded (in-process engine) | sglang (HTTP server or router)",
                       choices=("embedded", "sglang"))
    prefix_reuse: bool = option(True, "embedded: reuse cached prefix KV (radix cache across states)", identity=False)
    max_batch_rows: int = option(256, "embedded: sequences decoded at once", identity=False, ge=1)
    radix_cache_bytes: int = option(1 << 30, "embedded: bound of the cross-request radix prefix cache (KV bytes; "
                                    "0: share a prefix only among one request's samples)", identity=False, ge=0)
    dtype: str = option("float32", "embedded: compute dtype: float32 | bfloat16 | float16",
                       choices=("float32", "bfloat16", "float16"))
    url: str = option("http://127.0.0.1:30000", "sglang, launch: false: server or router address", identity=False)
    concurrency: int = option(32, "sglang: requests in flight", identity=False, ge=1)
    timeout_s: float = option(600.0, "sglang: seconds per request", identity=False, gt=0)
    max_retries: int = option(5, "sglang: retries of a failed request", identity=False, ge=0)
    launch: bool = option(False, "sglang: start (and afterwards stop) the servers for the stage's model",
                          identity=False)
    swap_weights: bool = option(False, "sglang: swap a server serving another model to the stage's model "
                                "(else: an error)", identity=False)
    servers: int = option(1, "sglang, launch: number of servers (a cache_aware router in front when > 1)",
                          identity=False, ge=1)
    tp: int = option(1, "sglang, launch: tensor-parallel GPUs per server", identity=False, ge=1)
    dp: int = option(1, "sglang, launch: data-parallel replicas per server", identity=False, ge=1)
    host: str = option("127.0.0.1", "sglang, launch: host to bind", identity=False)
    port: int = option(30000, "sglang, launch: router (or single server) port; servers on the next ones; "
                       "0 picks free ports", identity=False)
    device: str = option("auto", "sglang, launch: auto (cuda when torch sees a GPU) | cpu | cuda", identity=False,
                         choices=("auto", "cpu", "cuda"))
    mem_fraction_static: float = option(0.85, "sglang, launch on GPU: --mem-fraction-static", identity=False,
                                        gt=0, lt=1)
    server_args: list[str] = option(factory=list, doc="sglang, launch: extra sglang.launch_server arguments",
                                    identity=False)
    python: str = option("", "sglang, launch: interpreter with SGLang (default: $DAPO_SGLANG_VENV, else "
                         "the repo's .venv-sglang, else this one)", identity=False)
    router_path: str = option("", "sglang, launch: sglang-router executable (default: beside python, then PATH)",
                              identity=False)
    launch_timeout_s: float = option(900.0, "sglang, launch: bound on servers and router becoming healthy",
                                     identity=False, gt=0)
    recover_timeout_s: float = option(300.0, "sglang: bound on the fleet becoming healthy again after a server "
                                      "died mid-stage (a launched server is restarted)", identity=False, gt=0)
    max_recoveries: int = option(2, "sglang: recoveries per request before the stage stops", identity=False, ge=0)
    stop_grace_s: float = option(30.0, "sglang, launch: seconds from SIGTERM to SIGKILL", identity=False, ge=0)
    log_dir: str = option("", "sglang, launch: server and router logs (default: a new temporary directory)",
                          identity=False)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535 - self.servers:
            raise ValueError(f"backend.port must be in [0, {65535 - self.servers}], got {self.port}")
        if isinstance(self.server_args, str):
            raise ValueError("backend.server_args must be a list of strings, e.g. [--context-length, '4096']")
