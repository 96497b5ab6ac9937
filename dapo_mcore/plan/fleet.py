"""Generation-fleet sizing for the paper's data recipe (stages 1-2; derivation: ``docs/planner.md``).

Stage 1 (generate): P problems x K samples. Stage 2 (mc): for the M kept solutions of every problem,
each of its S non-terminal step-prefix states gets N completions. Token lengths are inputs (averages
for the task/model); server throughputs are inputs (measure them with ``scripts/bench_rollout.py``
or SGLang's ``bench_serving`` on the target GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Paper defaults: 7,500 MATH problems, K=128, M=6, N=16 (arXiv 2412.18279, sec. 4.1)."""

    problems: int = 7500
    samples: int = 128           # K
    keep: int = 6                # M solutions kept per problem
    completions: int = 16        # N per state
    prompt_tokens: float = 150.0    # average prompt (chat template + problem); an assumption
    solution_tokens: float = 500.0  # average solution length; an assumption
    steps: float = 12.0             # average reasoning steps (lines) per solution; an assumption

    def validate(self) -> None:
        for k in ("problems", "samples", "keep", "completions", "prompt_tokens", "solution_tokens", "steps"):
            if getattr(self, k) <= 0:
                raise ValueError(f"fleet recipe: {k} must be > 0, got {getattr(self, k)}")
        if self.keep > self.samples:
            raise ValueError(f"fleet recipe: keep={self.keep} > samples={self.samples}")


@dataclass(frozen=True)
class StageTokens:
    requests: float
    prefill_no_cache: float
    prefill_cached: float
    decode: float


def generate_tokens(r: Recipe) -> StageTokens:
    """P*K samples; without cache each prefills its prompt, with the radix cache one prompt per problem."""
    n = r.problems * r.samples
    return StageTokens(n, n * r.prompt_tokens, r.problems * r.prompt_tokens, n * r.solution_tokens)


def mc_tokens(r: Recipe) -> StageTokens:
    """States k = 0..S-1 of each kept solution: prefix ``prompt + sol*k/S``, completion ``sol*(S-k)/S``.

    Summed over k: prefixes ``S*prompt + sol*(S-1)/2``, completions ``sol*(S+1)/2`` per solution.
    Without cache every one of the N completions prefills its state's prefix; with the radix cache
    (a problem's requests routed to one server) each distinct prefix token is prefilled once: the prompt
    once per problem and ``sol*(S-1)/S`` per kept solution.
    """
    sols = r.problems * r.keep
    s, sol = r.steps, r.solution_tokens
    prefix_sum = s * r.prompt_tokens + sol * (s - 1) / 2
    return StageTokens(sols * s * r.completions, sols * r.completions * prefix_sum,
                       r.problems * r.prompt_tokens + sols * sol * (s - 1) / s,
                       sols * r.completions * sol * (s + 1) / 2)


@dataclass(frozen=True)
class FleetEstimate:
    stage: str
    tokens: StageTokens
    hours_no_cache: float
    hours_cached: float


def hours(t: StageTokens, servers: int, decode_tps: float, prefill_tps: float, cached: bool) -> float:
    """Wall-clock hours on ``servers`` SGLang servers, each sustaining the given tokens/s."""
    pre = t.prefill_cached if cached else t.prefill_no_cache
    return (pre / prefill_tps + t.decode / decode_tps) / servers / 3600.0


def estimate(r: Recipe, servers: int, decode_tps: float, prefill_tps: float) -> list[FleetEstimate]:
    """Generate and mc stages: tokens and hours, with and without prefix caching."""
    r.validate()
    if servers < 1 or decode_tps <= 0 or prefill_tps <= 0:
        raise ValueError("fleet: need servers >= 1 and positive decode/prefill tokens/s")
    out = []
    for name, t in (("generate", generate_tokens(r)), ("mc", mc_tokens(r))):
        out.append(FleetEstimate(name, t, hours(t, servers, decode_tps, prefill_tps, False),
                                 hours(t, servers, decode_tps, prefill_tps, True)))
    return out
