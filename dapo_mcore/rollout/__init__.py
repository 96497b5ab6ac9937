"""Rollouts (DAPO stages 1-2): step segmentation, states, generation backends (embedded engine
with prefix-KV reuse, SGLang HTTP client, SGLang-compatible server) and the generate / mc stages."""
from dapo_mcore.rollout.backend import GenerationBackend, GenRequest, SamplingParams
from dapo_mcore.rollout.common import BackendConfig, make_backend
from dapo_mcore.rollout.segment import TokenBytes, first_step, split_steps
from dapo_mcore.rollout.states import State, build_states

__all__ = ["GenerationBackend", "GenRequest", "SamplingParams", "BackendConfig", "make_backend", "TokenBytes",
           "first_step", "split_steps", "State", "build_states"]
