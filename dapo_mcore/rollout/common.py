"""What the rollout stages share: their common config (RolloutConfig), backend selection, the sharded-stage
runner and the progress/throughput meter."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from dapo_mcore.config import Checked, option
from dapo_mcore.data.shards import FORMATS, chunk, write_summary
from dapo_mcore.rollout.backend import GenerationBackend
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig
from dapo_mcore.rollout.backend_config import BackendConfig
from dapo_mcore.rollout.fleet import open_backend
from dapo_mcore.verify import VERIFIERS


@dataclass(kw_only=True)
class RolloutConfig(Checked):
    """The settings the rollout stages (generate, mc) share: sampling, verification, output, backend."""

    temperature: float = option(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = option(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = option(-1, "top-k sampling (-1: off; else >= 1)", ge=-1)
    max_new_tokens: int = option(256, "new tokens per sample at most", ge=1)
    verifier: str = option("exact", "answer verifier: exact | math | code", choices=tuple(VERIFIERS))
    verify_timeout_s: float = option(5.0, "verifier time limit per sample (per test for code)", gt=0)
    seed: int = option(0, "sampling seed (each request's: derived from it and the problem or state id)")
    fmt: str = option("parquet", "shard format: parquet | jsonl", choices=FORMATS)
    show_progress: bool = option(True, "progress bar", identity=False)
    backend: BackendConfig = option(factory=BackendConfig, doc="generation backend")

    def __post_init__(self):
        super().__post_init__()
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or >= 1, got 0")


def make_backend(cfg: BackendConfig, model_path: str) -> GenerationBackend:
    if cfg.kind == "embedded":
        return EmbeddedEngine(EngineConfig(model_path, prefix_reuse=cfg.prefix_reuse,
                                           max_batch_rows=cfg.max_batch_rows, dtype=cfg.dtype,
                                           radix_cache_bytes=cfg.radix_cache_bytes))
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
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=disable)


def print_summary(summary: dict, out_dir) -> None:
    """One human line for the end of a stage (the full summary is in ``out_dir/summary.json``)."""
    th, v = summary["throughput"], summary["verifier"]
    print(f"{summary['stage']}: {summary['shards_computed']}/{summary['shards']} shards computed, "
          f"{th['samples']} samples, {th['samples_per_s']:.1f} samples/s, {th['tokens_per_s']:.0f} tok/s, "
          f"prefix cache {th['cache_hit_rate']:.1%}, verifier {v['correct']}/{v['calls']} correct "
          f"({v['errors']} errors, {v['timeouts']} timeouts) -> {out_dir}/summary.json", flush=True)


def throughput_note(summary: dict) -> str:
    """The rollout stages' line in the report's stage table: samples, rates and the prefix-cache hit rate."""
    th = summary.get("throughput") or {}
    return (f"{th.get('samples', 0)} samples, {th.get('samples_per_s', 0):.1f} samples/s, "
            f"{th.get('tokens_per_s', 0):.0f} tok/s, prefix cache {th.get('cache_hit_rate', 0):.0%}")


def _counts(obj) -> dict:
    """The counters of a :class:`RolloutMeter` or a verifier's stats: its int fields and dicts of ints (e.g. the
    code verifier's per-verdict ``programs``)."""
    def count(x) -> bool:
        return type(x) is int   # not bool

    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in asdict(obj).items()
            if count(v) or (isinstance(v, dict) and v and all(count(x) for x in v.values()))}


def _combine(a: dict, b: dict, sign: int) -> dict:
    """``a + sign * b`` over the keys of both, recursing into dicts of counts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _combine(out.get(k) or {}, v, sign) if isinstance(v, dict) else out.get(k, 0) + sign * int(v)
    return out


def stage_counts(writer, counted: dict) -> dict:
    """The counters of ``counted`` (name -> meter/stats) summed over EVERY shard of the stage, those computed
    now and those a previous, interrupted run wrote (each shard's manifest entry keeps its own counts), so a
    resumed stage's summary counts its whole output, not just the last invocation's part. Returns
    ``{name: counts}`` per entry of ``counted`` plus ``counted_shards`` (int): a shard written without counts
    (an older run) adds nothing, and this says how many were counted."""
    shards = writer.manifest["shards"].values()
    out: dict = {name: _combine(_counts(obj), _counts(obj), -1) for name, obj in counted.items()}  # zeros, same keys
    for entry in shards:
        for name, c in (entry.get("counts") or {}).items():
            if name in out:
                out[name] = _combine(out[name], c, 1)
    out["counted_shards"] = sum(1 for e in shards if e.get("counts"))
    return out


def whole_throughput(meter: RolloutMeter, totals: dict[str, int]) -> dict:
    """``meter.summary()`` (rates and seconds: this invocation's) with the counts of the whole stage."""
    d = meter.summary()
    d.update(totals)
    d["cache_hit_rate"] = d["cached_tokens"] / d["prompt_tokens"] if d["prompt_tokens"] else 0.0
    d["rates_cover"] = "the shards computed in this invocation"
    return d


def run_sharded(desc: str, items: list, writer, *, shard_size: int, batch_size: int, backend, open_backend,
                process, meter: RolloutMeter, show_progress: bool, counted: dict | None = None) -> tuple[int, int]:
    """The skeleton shared by the rollout stages: split ``items`` into shards of ``shard_size``, skip the
    shards ``writer`` (a :class:`~dapo_mcore.data.shards.ShardedWriter`) already holds, and for each other
    shard call ``process(backend, batch) -> records`` on batches of ``batch_size`` items and write the records
    as one shard (atomic; an interrupted run resumes at the first missing shard). ``backend`` None:
    ``open_backend()`` makes one, only if there is work, and it is closed at the end. ``counted`` (name ->
    meter or verifier stats, fed by ``process``): each shard's share of their counters is stored with the
    shard (:func:`stage_counts` sums them). Returns ``(number of shards, shards computed now)``."""
    counted = counted or {"throughput": meter}
    shards = chunk(items, shard_size)
    todo = [i for i in range(len(shards)) if not writer.is_done(i)]
    own_backend = backend is None and bool(todo)
    if own_backend:
        backend = open_backend()
    bar = progress(sum(len(shards[i]) for i in todo), desc, disable=not show_progress)
    try:
        for si in todo:
            records, before = [], {name: _counts(obj) for name, obj in counted.items()}
            for batch in chunk(shards[si], batch_size):
                records.extend(process(backend, batch))
                bar.update(len(batch))
                bar.set_postfix(meter.postfix())
            counts = {name: _combine(_counts(obj), before[name], -1) for name, obj in counted.items()}
            writer.write_shard(si, records, counts=counts)
    finally:
        bar.close()
        if own_backend:
            backend.close()
    return len(shards), len(todo)


def finish_stage(writer, out_dir, num_shards: int, summary: dict, show: bool) -> dict:
    """Seal a rollout stage's output (manifest + ``summary.json``) and print its one-line summary."""
    writer.finalize(num_shards, summary)
    write_summary(out_dir, summary)
    if show:
        print_summary(summary, out_dir)
    return summary
