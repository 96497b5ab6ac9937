"""What the rollout stages share: backend selection and the progress/throughput meter."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from dapo_mcore.rollout.backend import GenerationBackend


@dataclass
class BackendConfig:
    """``kind``: ``"embedded"`` (in-process, default without a GPU) or ``"sglang"`` (HTTP to a
    server or router at ``url``). ``prefix_reuse``/``max_batch_rows``/``dtype``: embedded only;
    ``concurrency``/``timeout_s``/``max_retries``: sglang only.

    SGLang fleet (:mod:`dapo_mcore.rollout.fleet`; ``kind: sglang`` only). Before the first request
    every server (behind a router: every worker) is asked what it serves (``/get_model_info``).
    ``launch``: start the servers for the stage's model (``servers`` of them, each ``tp`` x ``dp``
    devices, on ``host`` at ``port`` (router, or the single server) and ``port+1..port+servers``
    behind one ``sglang-router --policy cache_aware`` when ``servers > 1``; ``port: 0`` picks free
    ports) and stop them, waiting until their processes are gone, when the stage ends; ``false``:
    use the external fleet at ``url``. ``swap_weights``: a server that serves another model is
    swapped to the stage's (``/update_weights_from_disk``, then ``/flush_cache``); ``false``: that is
    an error naming both models. ``device``: ``auto`` (``cuda`` if torch sees a GPU, else ``cpu``),
    ``cpu`` (SGLang's CPU engine with the flags of :data:`~dapo_mcore.rollout.fleet.CPU_SERVER_ARGS`)
    or ``cuda`` (``--tp-size/--dp-size/--mem-fraction-static``, server i on GPUs
    ``i*tp*dp .. (i+1)*tp*dp-1`` of the visible ones). ``server_args``: extra ``sglang.launch_server``
    arguments for every server. ``python``: the interpreter with SGLang (default: ``$DAPO_SGLANG_VENV``,
    else the repo's ``.venv-sglang`` from ``scripts/setup.sh --sglang`` if present, else this one);
    ``router_path``: the ``sglang-router`` executable (default: beside that python, then on PATH).
    ``launch_timeout_s``: the bound on servers and router becoming healthy; ``recover_timeout_s``:
    the bound on a fleet becoming healthy again after a server died mid-stage (a launched server is
    restarted), at most ``max_recoveries`` times per request before the stage stops;
    ``stop_grace_s``: SIGTERM to SIGKILL; ``log_dir``: server and router logs (default: a new
    temporary directory)."""

    kind: str = "embedded"
    prefix_reuse: bool = True
    max_batch_rows: int = 256
    dtype: str = "float32"
    url: str = "http://127.0.0.1:30000"
    concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 5
    launch: bool = False
    swap_weights: bool = False
    servers: int = 1
    tp: int = 1
    dp: int = 1
    host: str = "127.0.0.1"
    port: int = 30000
    device: str = "auto"
    mem_fraction_static: float = 0.85
    server_args: list[str] = field(default_factory=list)
    python: str = ""
    router_path: str = ""
    launch_timeout_s: float = 900.0
    recover_timeout_s: float = 300.0
    max_recoveries: int = 2
    stop_grace_s: float = 30.0
    log_dir: str = ""

    def __post_init__(self):
        if self.kind not in ("embedded", "sglang"):
            raise ValueError(f"backend kind must be 'embedded' or 'sglang', got {self.kind!r}")
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

    def identity(self) -> dict:
        """The fields that can change results (goes into the stage's config hash): the server
        address, concurrency and batch size do not."""
        return {"kind": self.kind, "dtype": self.dtype} if self.kind == "embedded" else {"kind": self.kind}


def make_backend(cfg: BackendConfig, model_path: str) -> GenerationBackend:
    if cfg.kind == "embedded":
        from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig

        return EmbeddedEngine(EngineConfig(model_path, prefix_reuse=cfg.prefix_reuse,
                                           max_batch_rows=cfg.max_batch_rows, dtype=cfg.dtype))
    from dapo_mcore.rollout.fleet import open_backend

    # checks (and with swap_weights swaps) what every server serves before returning; with
    # launch=True the servers are started here and stopped by the backend's close()
    return open_backend(cfg, model_path)


@dataclass
class RolloutMeter:
    """Throughput counters fed with SGLang-shaped samples; ``postfix()`` for the progress bar."""

    samples: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, samples: list[dict]) -> None:
        for s in samples:
            m = s["meta_info"]
            self.samples += 1
            self.prompt_tokens += int(m.get("prompt_tokens", 0))
            self.cached_tokens += int(m.get("cached_tokens", 0))
            self.completion_tokens += int(m.get("completion_tokens", 0))

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def postfix(self) -> dict:
        return {"samples/s": f"{self.samples / self.elapsed:.1f}",
                "tok/s": f"{(self.prompt_tokens + self.completion_tokens) / self.elapsed:.0f}",
                "cache": f"{self.cache_hit_rate:.0%}"}

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "t0"}
        d.update(seconds=round(self.elapsed, 3), samples_per_s=self.samples / self.elapsed,
                 tokens_per_s=(self.prompt_tokens + self.completion_tokens) / self.elapsed,
                 cache_hit_rate=self.cache_hit_rate)
        return d


def progress(total: int, desc: str, disable: bool | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=disable)


def print_summary(summary: dict, out_dir) -> None:
    """One human line for the end of a stage (the full summary is in ``out_dir/summary.json``)."""
    th, v = summary["throughput"], summary["verifier"]
    print(f"{summary['stage']}: {summary['shards_computed']}/{summary['shards']} shards computed, "
          f"{th['samples']} samples, {th['samples_per_s']:.1f} samples/s, {th['tokens_per_s']:.0f} tok/s, "
          f"prefix cache {th['cache_hit_rate']:.1%}, verifier {v['correct']}/{v['calls']} correct "
          f"({v['errors']} errors, {v['timeouts']} timeouts) -> {out_dir}/summary.json", flush=True)


def run_sharded(desc: str, items: list, writer, *, shard_size: int, batch_size: int, backend, open_backend,
                process, meter: RolloutMeter, show_progress: bool) -> tuple[int, int]:
    """The skeleton shared by the rollout stages: split ``items`` into shards of ``shard_size``, skip the
    shards ``writer`` (a :class:`~dapo_mcore.data.shards.ShardedWriter`) already holds, and for each other
    shard call ``process(backend, batch) -> records`` on batches of ``batch_size`` items and write the records
    as one shard (atomic; an interrupted run resumes at the first missing shard). ``backend`` None:
    ``open_backend()`` makes one, only if there is work, and it is closed at the end.
    Returns ``(number of shards, shards computed now)``."""
    from dapo_mcore.data.shards import chunk

    shards = chunk(items, shard_size)
    todo = [i for i in range(len(shards)) if not writer.is_done(i)]
    own_backend = backend is None and bool(todo)
    if own_backend:
        backend = open_backend()
    bar = progress(sum(len(shards[i]) for i in todo), desc, disable=not show_progress)
    try:
        for si in todo:
            records = []
            for batch in chunk(shards[si], batch_size):
                records.extend(process(backend, batch))
                bar.update(len(batch))
                bar.set_postfix(meter.postfix())
            writer.write_shard(si, records)
    finally:
        bar.close()
        if own_backend:
            backend.close()
    return len(shards), len(todo)


def finish_stage(writer, out_dir, num_shards: int, summary: dict, show: bool) -> dict:
    """Seal a rollout stage's output (manifest + ``summary.json``) and print its one-line summary."""
    from dapo_mcore.data.shards import write_json_summary

    writer.finalize(num_shards, summary)
    write_json_summary(out_dir, "summary.json", summary)
    if show:
        print_summary(summary, out_dir)
    return summary
