"""What the rollout stages share: backend selection and the progress/throughput meter."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from dapo_mcore.rollout.backend import GenerationBackend


@dataclass
class BackendConfig:
    """``kind``: ``"embedded"`` (in-process, default without a GPU) or ``"sglang"`` (HTTP to a
    server or router at ``url``). ``prefix_reuse``/``max_batch_rows``/``dtype``: embedded only;
    ``concurrency``/``timeout_s``/``max_retries``: sglang only."""

    kind: str = "embedded"
    prefix_reuse: bool = True
    max_batch_rows: int = 256
    dtype: str = "float32"
    url: str = "http://127.0.0.1:30000"
    concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 5

    def __post_init__(self):
        if self.kind not in ("embedded", "sglang"):
            raise ValueError(f"backend kind must be 'embedded' or 'sglang', got {self.kind!r}")

    def identity(self) -> dict:
        """The fields that can change results (goes into the stage's config hash): the server
        address, concurrency and batch size do not."""
        return {"kind": self.kind, "dtype": self.dtype} if self.kind == "embedded" else {"kind": self.kind}


def make_backend(cfg: BackendConfig, model_path: str) -> GenerationBackend:
    if cfg.kind == "embedded":
        from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig

        return EmbeddedEngine(EngineConfig(model_path, prefix_reuse=cfg.prefix_reuse,
                                           max_batch_rows=cfg.max_batch_rows, dtype=cfg.dtype))
    from dapo_mcore.rollout.sglang_client import SGLangClient, SGLangClientConfig

    return SGLangClient(SGLangClientConfig(cfg.url, cfg.concurrency, cfg.timeout_s, cfg.max_retries))


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
