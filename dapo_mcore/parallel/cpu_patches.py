"""megatron-core 0.16 on a machine without CUDA: the few CUDA-only calls it makes, redirected to CPU.

Applied once by :func:`apply` (called from :func:`dapo_mcore.parallel.runtime.initialize_parallel`
before any model is built) and **only when CUDA is absent**; on a GPU machine nothing here runs.
Each patch names the megatron call it fixes. Measured facts behind them:
``../shared/notes/megatron-core-on-cpu.md``.

Mechanisms (one each):

* ``torch.cuda.current_device()`` -> ``"cpu"``: the device argument of tensor factories in
  ``tensor_parallel/mappings.py`` (``_gather_along_first_dim``, ``_reduce_scatter_along_first_dim``),
  ``tensor_parallel/layers.py``, ``pipeline_parallel/p2p_communication.py`` (``_communicate_shapes``,
  ``_communicate``), ``distributed/param_and_grad_buffer.py`` and ``models/common/embeddings/rotary_pos_embedding.py``.
* ``torch.cuda.synchronize()`` -> no-op: ``p2p_communication._batched_p2p_ops`` / ``_communicate``.
* Modules that hard-code ``device="cuda"`` get a module-local ``torch`` whose tensor factories map a CUDA
  device to CPU (see :data:`_CUDA_LITERAL_MODULES` for the exact calls).
* ``Tensor.cuda()`` -> the tensor itself: ``DistributedOptimizer`` fully-reshardable save
  (``send_tensor.cuda()``), ``MixedPrecisionOptimizer.load_state_dict`` (``v.cuda()``).
* ``clip_grads.clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``
  and uses Apex/TE multi-tensor kernels: replaced by a ``torch._foreach_mul_`` version (same math).
* ``moe_utils.te_general_gemm`` -> None when Transformer Engine is absent: ``moe_utils`` imports it inside a
  ``try`` and leaves the name undefined on ImportError, but ``RouterGatingLinearFunction.forward/backward``
  (the MoE router GEMM, ``router_gating_linear``) test ``te_general_gemm is not None`` unguarded (NameError).
* ``clip_grads.get_grad_norm_fp32``'s L2 path calls a multi-tensor L2 norm kernel (Apex/TE) whose
  fallback is fine on CPU; only its ``device='cuda'`` factories needed the module-local ``torch``.

The dropout RNG tracker is not patched: :func:`dapo_mcore.parallel.runtime.initialize_parallel` installs
megatron's own inference tracker (``initialize_rng_tracker(inference_rng_tracker=True)``) whose ``fork()``
is a null context, so ``get_cuda_rng_tracker().fork()`` never touches CUDA RNG state. Consequence: no
per-TP-rank dropout streams on CPU, so CPU configs use dropout 0.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

import torch

_APPLIED = False

# module -> the calls in it that hard-code device="cuda" (megatron-core 0.16.1)
_CUDA_LITERAL_MODULES: dict[str, str] = {
    "megatron.core.pipeline_parallel.schedules":
        "forward_backward_no_pipelining / forward_backward_pipelining_*: total_num_tokens = torch.zeros(..., device='cuda')",
    "megatron.core.optimizer.optimizer":
        "MixedPrecisionOptimizer.__init__ (found_inf, _dummy_overflow_buf, _scale_one), FP32Optimizer.__init__ (_scale)",
    "megatron.core.optimizer.clip_grads":
        "get_grad_norm_fp32 (total_norm_cuda, dummy_overflow_buf, grad_norm), count_zeros_fp32 (total_num_zeros)",
    "megatron.core.optimizer.grad_scaler":
        "ConstantGradScaler/DynamicGradScaler.__init__ (_scale, min_scale, growth_factor, backoff_factor)",
    "megatron.core.transformer.utils":
        "get_default_causal_mask / get_sliding_window_causal_mask (torch.ones(..., device='cuda'))",
    "megatron.core.utils":
        "get_batch_on_this_cp_rank helpers and l2 norm (torch.tensor(..., device='cuda'))",
    "megatron.core.tensor_parallel.data":
        "_build_key_size_numel_dictionaries (sizes_cuda = torch.tensor(..., device='cuda'))",
    "megatron.core.distributed.param_and_grad_buffer":
        "_ParamAndGradBuffer warm-up (torch.zeros([1], device='cuda'))",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "verify_global_md_reuse (torch.tensor(..., device='cuda'))",
    "megatron.core.dist_checkpointing.exchange_utils":
        "exchange_loaded_tensors_* (torch.empty(..., device='cuda'))",
}

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like", "ones_like",
              "randn", "rand")


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device in torch factories
    return str(device).startswith("cuda")


def _cpu_factory(fn):
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _CpuTorch(types.ModuleType):
    """A stand-in for ``torch`` inside one megatron module: CUDA devices in factories become CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """CPU version of ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (same math)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_TENSOR_TYPE = torch.Tensor.type


def _cuda_named_type(self, dtype=None, non_blocking: bool = False, **kwargs):
    """``Tensor.type()`` that names a CPU tensor as its CUDA twin (``torch.BFloat16Tensor`` ->
    ``torch.cuda.BFloat16Tensor``); with a ``dtype`` argument it is the plain conversion."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _with_cuda_type_names(init):
    """Wrap an optimizer ``__init__`` whose parameter classification compares ``param.type()`` with the
    ``torch.cuda.*Tensor`` names: during that call only, CPU tensors report the CUDA names."""

    def wrapper(self, *args, **kwargs):
        torch.Tensor.type = _cuda_named_type  # type: ignore[method-assign]
        try:
            return init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE  # type: ignore[method-assign]

    wrapper.__wrapped__ = init  # type: ignore[attr-defined]
    return wrapper


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Apply every patch if CUDA is absent (idempotent). Returns True if patches are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cuda_absent():
        return False

    # torch.cuda.current_device(): device= of factories all over megatron (see module docstring).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # torch.cuda.synchronize(): p2p_communication._batched_p2p_ops / _communicate.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # Tensor.cuda(): DistributedOptimizer fully-reshardable save, MixedPrecisionOptimizer.load_state_dict.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    cpu_torch = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        mod.torch = cpu_torch  # type: ignore[attr-defined]

    # clip_grads.clip_grad_by_total_norm_fp32: CUDA tensor-type assert + multi-tensor scale kernel.
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    for name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer"):
        mod = importlib.import_module(name)
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # Float16OptimizerWithFloat16Params.__init__ and DistributedOptimizer.__init__
    # (_build_model_and_main_param_groups): `param.type() in ['torch.cuda.HalfTensor',
    # 'torch.cuda.BFloat16Tensor']` / `== 'torch.cuda.FloatTensor'` else TypeError "Wrapped parameters must be
    # one of torch.cuda.FloatTensor, ...": bf16 params with fp32 main params and the distributed optimizer.
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)

    # tensor_parallel.random.CheckpointFunction (activation recompute) saves and restores the CUDA RNG
    # state with _get_cuda_rng_state (torch.cuda.random.get_rng_state: "Torch not compiled with CUDA")
    # and _set_cuda_rng_state. Without CUDA there is no such state: get -> None, set -> no-op. The CPU RNG
    # state and the tracker's get_states()/set_states() (a dict of named states, empty for the inference
    # tracker installed on CPU) are saved and restored by megatron itself.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: None
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: None

    # moe_utils.RouterGatingLinearFunction.forward/backward read `te_general_gemm`, which moe_utils defines only
    # when Transformer Engine imports (NameError otherwise): None selects its torch.mm/addmm path.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _APPLIED = True
    return True
