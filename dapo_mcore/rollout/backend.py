"""One generation interface for every backend, speaking SGLang's ``/generate`` schema.

Request (per prompt): ``input_ids`` + ``sampling_params`` (``n``, ``temperature``, ``top_p``,
``top_k``, ``max_new_tokens``, ``stop``, ``stop_token_ids``, ``ignore_eos``, ``sampling_seed``).
Each sample comes back as SGLang returns it::

    {"text": str, "output_ids": [int], "meta_info": {"id", "prompt_tokens", "completion_tokens",
     "cached_tokens", "finish_reason": {"type": "stop", "matched": int | str} | {"type": "length",
     "length": int}}}

``output_ids`` include a matched stop/EOS token; ``text`` excludes special tokens and is cut
before a matched stop string.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol


@dataclass
class SamplingParams:
    """SGLang sampling parameters (the subset the rollout stages use). ``top_k=-1``: off;
    ``temperature=0``: greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    sampling_seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def to_sglang(self) -> dict:
        """Explicit dict (temperature/top_p/top_k always present; SGLang would otherwise read
        them from the model's generation_config.json)."""
        d = asdict(self)
        if d["sampling_seed"] is None:
            del d["sampling_seed"]
        return d

    @classmethod
    def from_sglang(cls, d: dict) -> "SamplingParams":
        """Parse a request's ``sampling_params``; unknown keys are ignored, as SGLang ignores
        keys it does not use here (penalties etc.)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def sample_seed(request_seed: int | None, index: int) -> int | None:
    """Seed of sample ``index`` of a request seeded with ``request_seed`` (63-bit)."""
    if request_seed is None:
        return None
    h = hashlib.sha256(f"{request_seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_from_id(base_seed: int, key: str) -> int:
    """Request seed derived from a run seed and a state/problem id (batching-independent)."""
    h = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


@dataclass
class GenRequest:
    """One prompt with its ``n`` samples. ``return_logprob``: add ``output_token_logprobs``
    (``[logprob, token_id, None]`` per output token, model distribution before temperature) and,
    with ``top_logprobs_num > 0``, ``output_top_logprobs``."""

    input_ids: list[int]
    params: SamplingParams
    rid: str = ""
    return_logprob: bool = False
    top_logprobs_num: int = 0

    def __post_init__(self):
        if not self.input_ids:
            raise ValueError(f"request {self.rid!r}: input_ids is empty")


class GenerationBackend(Protocol):
    """What the stages call: ``generate(requests)`` -> per request, its ``n`` samples (dicts in
    SGLang's response shape, see module doc), in request order."""

    def generate(self, requests: list[GenRequest]) -> list[list[dict[str, Any]]]: ...

    def close(self) -> None: ...
