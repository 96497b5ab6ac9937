"""HF safetensors <-> megatron model chunks, for any TP/PP, one tensor at a time.

* :func:`load_hf_weights` fills this rank's model chunk(s) from an HF checkpoint directory, reading only
  this rank's slice of each tensor (``safe_open(...).get_slice``): a 72B checkpoint never needs more
  than one tensor slice in RAM per rank.
* :func:`save_hf_checkpoint` writes an HF checkpoint from the (TP/PP-sharded) model: each tensor is
  all-gathered over TP, converted, and appended to a size-capped shard file by the TP-rank-0/DP-rank-0
  process of each pipeline stage; rank 0 writes ``model.safetensors.index.json``.

Layouts that matter (``../shared/notes/megatron-core-on-cpu.md``): megatron's fused QKV is interleaved per
KV group (``[q heads of group g; k_g; v_g]`` for each group, weight and bias) and a plain split on dim 0
gives the TP shards; the SwiGLU ``linear_fc1`` is ``[gate; up]`` *per TP rank*. Qwen3's q/k RMSNorm
weights (``q_norm``/``k_norm``, ``[head_dim]``) are replicated. MoE (Qwen3-MoE ``mlp.experts.{e}.{gate,up,
down}_proj``, Mixtral ``block_sparse_moe.experts.{e}.{w1,w3,w2}``, the hub's per-expert layout; router
``gate`` -> ``mlp.router``): megatron's ``SequentialMLP`` holds ``E/ep`` local experts per EP rank (local
``j`` = global ``ep_rank * E/ep + j``), each ``linear_fc1`` ``[gate; up]`` per expert-TP rank like the dense MLP.
The value model is written as ``<Arch>ForTokenClassification`` with ``num_labels=1`` (``score.weight``,
``score.bias``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from dapo_mcore.models.gpt import unwrap_model
from dapo_mcore.models.hf_config import GGUF_ADVICE, ArchSpec

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatching checkpoint file/tensor."""


# ---------------------------------------------------------------------------------------------- reading
def _no_safetensors_message(d: Path) -> str:
    """What is wrong with a checkpoint directory that has no safetensors weights, and what to do."""
    msg = f"{d}: no model.safetensors or model.safetensors.index.json"
    if not d.is_dir():
        return msg
    gguf = sorted(d.glob("*.gguf"))
    if gguf:
        return f"{msg}; found a GGUF (quantised llama.cpp) file {gguf[0].name}. {GGUF_ADVICE}"
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        return (f"{msg}; found PyTorch pickle weights ({bins[0].name}): convert them to safetensors first "
                "(transformers: from_pretrained(dir).save_pretrained(out, safe_serialization=True))")
    return msg


class HFReader:
    """Lazy reader of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[str, object] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})") from None
        elif single.is_file():
            self.weight_map = {k: single.name for k in self._open(single.name).keys()}
        else:
            raise CheckpointError(_no_safetensors_message(self.dir))

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            path = self.dir / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: checkpoint shard missing")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
            self._handles[fname] = h
        return self._handles[fname]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def slice(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> Tensor:
        """``tensor[start:stop]`` along ``dim`` (all of it when start is None), read from disk."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        try:
            sl = self._open(self.weight_map[name]).get_slice(name)
            if start is None:
                return sl[:]
            idx = tuple([slice(None)] * dim + [slice(start, stop)])
            return sl[idx]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.dir / self.weight_map[name]}: cannot read {name!r} ({e})") from None


# ----------------------------------------------------------------------------------------- the mapping
@dataclass(frozen=True)
class _Layout:
    arch: ArchSpec
    tp: int
    tp_rank: int
    value: bool
    ep: int = 1          # expert parallel size / rank (MoE): local expert j is global expert ep_rank * E/ep + j
    ep_rank: int = 0
    etp: int = 1         # experts' tensor parallel size / rank (megatron's expert_tensor_parallel_*)
    etp_rank: int = 0

    @property
    def local_experts(self) -> int:
        return self.arch.num_experts // self.ep

    @property
    def groups_per_rank(self) -> int:
        return self.arch.num_kv_heads // self.tp

    @property
    def heads_per_group(self) -> int:
        return self.arch.num_heads // self.arch.num_kv_heads


def _hf_attn(layer: int, proj: str, kind: str) -> str:
    return f"model.layers.{layer}.self_attn.{proj}.{kind}"


def _hf_router(arch: ArchSpec, layer: int) -> str:
    block = "block_sparse_moe" if arch.model_type == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"


def _hf_expert(arch: ArchSpec, layer: int, e: int) -> tuple[str, str, str]:
    """HF names of expert ``e``'s (gate, up, down) weights (the hub's per-expert safetensors layout)."""
    if arch.model_type == "mixtral":
        pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        return f"{pre}.w1.weight", f"{pre}.w3.weight", f"{pre}.w2.weight"
    pre = f"model.layers.{layer}.mlp.experts.{e}"
    return f"{pre}.gate_proj.weight", f"{pre}.up_proj.weight", f"{pre}.down_proj.weight"


def _expert_param(name: str) -> Optional[tuple[int, int, str]]:
    """``(local layer, local expert, "linear_fc1"|"linear_fc2")`` of a megatron expert weight, else None."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    e = _EXPERT_RE.match(m.group(2))
    return (int(m.group(1)), int(e.group(1)), e.group(2)) if e else None


def _read_local(rd: HFReader, lay: _Layout, mname: str, layer_offset: int, lm_head: bool) -> Tensor:
    """This TP rank's megatron tensor ``mname`` (local layer numbering), read from the HF checkpoint."""
    a, tp, r = lay.arch, lay.tp, lay.tp_rank

    def rows(name: str, n: int) -> Tensor:  # split on dim 0
        return rd.slice(name, 0, r * n // tp, (r + 1) * n // tp)

    def cols(name: str, n: int) -> Tensor:  # split on dim 1
        return rd.slice(name, 1, r * n // tp, (r + 1) * n // tp)

    if mname == "embedding.word_embeddings.weight":
        return rows("model.embed_tokens.weight", a.vocab_size)
    if mname == "decoder.final_layernorm.weight":
        return rd.slice("model.norm.weight")
    if mname == "output_layer.weight":
        if lay.value:
            return rd.slice("score.weight")
        src = "lm_head.weight" if (lm_head and not a.tie_word_embeddings) else "model.embed_tokens.weight"
        return rows(src, a.vocab_size)
    if mname == "output_layer.bias" and lay.value:
        return rd.slice("score.bias")
    m = _LAYER_RE.match(mname)
    if not m:
        raise CheckpointError(f"no HF mapping for megatron tensor {mname!r}")
    L, rest = int(m.group(1)) + layer_offset, m.group(2)
    pre = f"model.layers.{L}"
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return rd.slice(f"{pre}.input_layernorm.weight")
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return rd.slice(f"{pre}.post_attention_layernorm.weight")
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        d, g0, gn, hpg = a.head_dim, r * lay.groups_per_rank, lay.groups_per_rank, lay.heads_per_group
        q = rd.slice(_hf_attn(L, "q_proj", kind), 0, g0 * hpg * d, (g0 + gn) * hpg * d)
        k = rd.slice(_hf_attn(L, "k_proj", kind), 0, g0 * d, (g0 + gn) * d)
        v = rd.slice(_hf_attn(L, "v_proj", kind), 0, g0 * d, (g0 + gn) * d)
        parts = []
        for g in range(gn):
            parts += [q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        return torch.cat(parts, 0)
    if rest == "self_attention.linear_proj.weight":
        return cols(_hf_attn(L, "o_proj", "weight"), a.num_heads * a.head_dim)
    if rest == "self_attention.q_layernorm.weight":
        return rd.slice(_hf_attn(L, "q_norm", "weight"))
    if rest == "self_attention.k_layernorm.weight":
        return rd.slice(_hf_attn(L, "k_norm", "weight"))
    if rest == "mlp.router.weight":
        return rd.slice(_hf_router(a, L))
    if (em := _EXPERT_RE.match(rest)) is not None:
        e = lay.ep_rank * lay.local_experts + int(em.group(1))
        gate, up, down = _hf_expert(a, L, e)
        f, n, k = a.moe_ffn_hidden_size, lay.etp, lay.etp_rank
        if em.group(2) == "linear_fc1":
            return torch.cat([rd.slice(gate, 0, k * f // n, (k + 1) * f // n),
                              rd.slice(up, 0, k * f // n, (k + 1) * f // n)], 0)
        return rd.slice(down, 1, k * f // n, (k + 1) * f // n)
    if rest == "mlp.linear_fc1.weight":
        f = a.ffn_hidden_size
        return torch.cat([rows(f"{pre}.mlp.gate_proj.weight", f), rows(f"{pre}.mlp.up_proj.weight", f)], 0)
    if rest == "mlp.linear_fc2.weight":
        return cols(f"{pre}.mlp.down_proj.weight", a.ffn_hidden_size)
    raise CheckpointError(f"no HF mapping for megatron tensor {mname!r}")


def _to_hf(lay: _Layout, mname: str, shards: list[Tensor], layer_offset: int) -> list[tuple[str, Tensor]]:
    """HF tensors from the list of TP shards (rank order) of megatron tensor ``mname``."""
    a = lay.arch
    cat0 = lambda: torch.cat(shards, 0)  # noqa: E731
    if mname == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", cat0())]
    if mname == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    if mname == "output_layer.weight":
        if lay.value:
            return [("score.weight", shards[0])]
        return [] if a.tie_word_embeddings else [("lm_head.weight", cat0())]
    if mname == "output_layer.bias" and lay.value:
        return [("score.bias", shards[0])]
    m = _LAYER_RE.match(mname)
    if not m:
        raise CheckpointError(f"no HF mapping for megatron tensor {mname!r}")
    L, rest = int(m.group(1)) + layer_offset, m.group(2)
    pre = f"model.layers.{L}"
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return [(f"{pre}.input_layernorm.weight", shards[0])]
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return [(f"{pre}.post_attention_layernorm.weight", shards[0])]
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        d, hpg = a.head_dim, lay.heads_per_group
        full = cat0().reshape(a.num_kv_heads, (hpg + 2) * d, *shards[0].shape[1:])
        q = full[:, :hpg * d].reshape(a.num_heads * d, *shards[0].shape[1:])
        k = full[:, hpg * d:(hpg + 1) * d].reshape(a.num_kv_heads * d, *shards[0].shape[1:])
        v = full[:, (hpg + 1) * d:].reshape(a.num_kv_heads * d, *shards[0].shape[1:])
        return [(_hf_attn(L, "q_proj", kind), q.contiguous()), (_hf_attn(L, "k_proj", kind), k.contiguous()),
                (_hf_attn(L, "v_proj", kind), v.contiguous())]
    if rest == "self_attention.linear_proj.weight":
        return [(_hf_attn(L, "o_proj", "weight"), torch.cat(shards, 1))]
    if rest == "self_attention.q_layernorm.weight":
        return [(_hf_attn(L, "q_norm", "weight"), shards[0])]
    if rest == "self_attention.k_layernorm.weight":
        return [(_hf_attn(L, "k_norm", "weight"), shards[0])]
    if rest == "mlp.router.weight":
        return [(_hf_router(a, L), shards[0])]
    if (em := _EXPERT_RE.match(rest)) is not None:   # here the expert index is global (see _model_hf_tensors)
        gate, up, down = _hf_expert(a, L, int(em.group(1)))
        if em.group(2) == "linear_fc1":
            half = shards[0].shape[0] // 2
            return [(gate, torch.cat([x[:half] for x in shards], 0)), (up, torch.cat([x[half:] for x in shards], 0))]
        return [(down, torch.cat(shards, 1))]
    if rest == "mlp.linear_fc1.weight":
        half = shards[0].shape[0] // 2
        return [(f"{pre}.mlp.gate_proj.weight", torch.cat([s[:half] for s in shards], 0)),
                (f"{pre}.mlp.up_proj.weight", torch.cat([s[half:] for s in shards], 0))]
    if rest == "mlp.linear_fc2.weight":
        return [(f"{pre}.mlp.down_proj.weight", torch.cat(shards, 1))]
    raise CheckpointError(f"no HF mapping for megatron tensor {mname!r}")


def _rank_layout(arch: ArchSpec, value: bool) -> _Layout:
    """This rank's coordinates in megatron's current layout (TP, and EP/expert-TP for MoE)."""
    from megatron.core import parallel_state as ps

    kw = {}
    if arch.is_moe:
        kw = dict(ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
                  etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank())
    return _Layout(arch, ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), value, **kw)


def _layer_offset(chunk) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(chunk.config, vp_stage=getattr(chunk, "vp_stage", None))


def _local_params(chunk) -> Iterable[tuple[str, Tensor]]:
    """Named parameters (incl. the tied output weight on a last PP stage) in a deterministic order."""
    seen = set()
    for name, p in chunk.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


# ---------------------------------------------------------------------------------------------- loading
def load_hf_weights(chunks: list, model_dir: str | Path, arch: ArchSpec, *, init_value_head: bool = True) -> None:
    """Copy HF weights into this rank's megatron chunk(s), slicing for its TP rank (and, for MoE, reading only
    this EP rank's experts, sliced for its expert-TP rank).

    For the value model, ``score.*`` is loaded if the checkpoint has it (a value-model export);
    otherwise (initialising the critic from a policy) the head keeps its fresh init when
    ``init_value_head`` is True, and a missing head is an error when it is False.
    """
    rd = HFReader(model_dir)
    lm_head = rd.has("lm_head.weight")
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        lay = _rank_layout(arch, bool(getattr(chunk, "is_value_model", False)))
        value = lay.value
        off = _layer_offset(chunk)
        for name, p in _local_params(chunk):
            if value and name.startswith("output_layer.") and not rd.has("score.weight"):
                if init_value_head:
                    continue
                raise CheckpointError(f"{model_dir}: value model requested but no score.weight in checkpoint")
            t = _read_local(rd, lay, name, off, lm_head)
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{model_dir}: tensor for {name} has shape {tuple(t.shape)}, "
                                      f"model expects {tuple(p.shape)} (wrong config for these weights?)")
            with torch.no_grad():
                p.copy_(t.to(p.dtype))


# ---------------------------------------------------------------------------------------------- saving
class _ShardWriter:
    """Appends tensors to size-capped safetensors files ``model-<tag>-<k>.safetensors``."""

    def __init__(self, out: Path, tag: str, max_bytes: int):
        self.out, self.tag, self.max_bytes = out, tag, max_bytes
        self.buf: dict[str, Tensor] = {}
        self.size, self.k = 0, 0
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        self.buf[name] = t
        self.size += t.numel() * t.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.torch import save_file

        fname = f"model-{self.tag}-{self.k:05d}.safetensors"
        tmp = self.out / (fname + ".tmp")
        save_file(self.buf, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out / fname)
        for n in self.buf:
            self.weight_map[n] = fname
        self.buf, self.size, self.k = {}, 0, self.k + 1


def hf_config_dict(arch: ArchSpec, value: bool, base: Optional[dict] = None) -> dict:
    """The ``config.json`` of an export (starting from the source checkpoint's config when given)."""
    cfg = dict(base or {})
    cfg.update(model_type=arch.model_type, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
               intermediate_size=arch.ffn_hidden_size, num_hidden_layers=arch.num_layers,
               num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
               max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.rms_norm_eps,
               tie_word_embeddings=arch.tie_word_embeddings and not value, hidden_act="silu")
    if arch.head_dim != arch.hidden_size // arch.num_heads:
        cfg["head_dim"] = arch.head_dim
    if "rope_parameters" not in cfg and "rope_theta" not in cfg:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.model_type in ("llama", "qwen3", "qwen3_moe"):
        cfg.setdefault("attention_bias", arch.qkv_bias)
    if arch.model_type in ("qwen3", "qwen3_moe", "mistral", "mixtral"):
        cfg["head_dim"] = arch.head_dim
    if arch.model_type in ("mistral", "mixtral"):
        cfg.setdefault("sliding_window", arch.sliding_window)
    if arch.model_type == "qwen3_moe":
        cfg.update(num_experts=arch.num_experts, moe_intermediate_size=arch.moe_ffn_hidden_size,
                   num_experts_per_tok=arch.moe_topk, norm_topk_prob=arch.moe_norm_topk)
        cfg.setdefault("decoder_sparse_step", 1)
        cfg.setdefault("mlp_only_layers", [])
    if arch.model_type == "mixtral":
        cfg.update(num_local_experts=arch.num_experts, num_experts_per_tok=arch.moe_topk)
    cls = arch.hf_architecture
    if value:
        cls = cls.replace("ForCausalLM", "ForTokenClassification")
        cfg.update(num_labels=1, id2label={"0": "value"}, label2id={"value": 0}, classifier_dropout=0.0,
                   dapo_value_model=True)
    cfg["architectures"] = [cls]
    cfg["torch_dtype"] = cfg.get("torch_dtype", "float32")
    return cfg


def _model_hf_tensors(chunks: list, arch: ArchSpec, getter: Callable[[str, Tensor], Optional[Tensor]]):
    """Yield ``(chunk_index, hf_name, full_tensor)`` on this stage's TP-rank-0/DP-rank-0 process.

    Collective over the TP group (MoE experts: the expert-TP and EP groups). ``getter(name, param)`` picks what to convert (the weight, its grad, ...);
    returning None skips the tensor. Also yields nothing (but takes part in the gathers) on other ranks.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    tp_group = ps.get_tensor_model_parallel_group()
    writer = r == 0 and ps.get_data_parallel_rank() == 0
    for ci, chunk in enumerate(chunks):
        chunk = unwrap_model(chunk)
        lay = _rank_layout(arch, bool(getattr(chunk, "is_value_model", False)))
        value = lay.value
        off = _layer_offset(chunk)
        for name, p in _local_params(chunk):
            if name == "output_layer.weight" and arch.tie_word_embeddings and not value:
                continue  # tied: the embedding is written from the first stage
            t = getter(name, p)
            if t is None:
                continue
            t = t.detach().contiguous()
            expert = _expert_param(name) if arch.is_moe else None
            if expert is not None:
                for gname, shards in _gather_expert(lay, name, expert, t):
                    if writer:
                        for hname, ht in _to_hf(lay, gname, shards, off):
                            yield ci, hname, ht
                continue
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(shards, t, group=tp_group)
            else:
                shards = [t]
            if writer:
                for hname, ht in _to_hf(lay, name, shards, off):
                    yield ci, hname, ht


def _gather_expert(lay: _Layout, name: str, expert: tuple[int, int, str], t: Tensor):
    """``(megatron name with the *global* expert index, expert-TP shards)`` for every EP rank's copy of local
    expert ``j`` (collective over the expert-TP and EP groups)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    layer, j, which = expert
    shards = [t]
    if lay.etp > 1:
        shards = [torch.empty_like(t) for _ in range(lay.etp)]
        dist.all_gather(shards, t, group=ps.get_expert_tensor_parallel_group())
    per_ep = [shards]
    if lay.ep > 1:
        per_ep = [[None] * len(shards) for _ in range(lay.ep)]
        for i, s in enumerate(shards):
            got = [torch.empty_like(s) for _ in range(lay.ep)]
            dist.all_gather(got, s, group=ps.get_expert_model_parallel_group())
            for k in range(lay.ep):
                per_ep[k][i] = got[k]
    for k, sh in enumerate(per_ep):
        yield f"decoder.layers.{layer}.mlp.experts.local_experts.{k * lay.local_experts + j}.{which}.weight", sh


def _is_value(chunks: list) -> bool:
    return bool(getattr(unwrap_model(chunks[0]), "is_value_model", False))


def collect_hf_state(chunks: list, arch: ArchSpec,
                     getter: Callable[[str, Tensor], Optional[Tensor]] = lambda n, p: p) -> Optional[dict]:
    """All HF-named tensors of the model gathered on global rank 0 (collective; small models/tests).

    ``getter`` as in :func:`save_hf_checkpoint`'s weights, e.g. ``lambda n, p: p.main_grad`` for grads.
    """
    import torch.distributed as dist

    local = {h: t.cpu().clone() for _, h, t in _model_hf_tensors(chunks, arch, getter)}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    if dist.get_rank() != 0:
        return None
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


def save_hf_checkpoint(chunks: list, out_dir: str | Path, arch: ArchSpec, *, source_dir: Optional[str | Path] = None,
                       max_shard_bytes: int = 2 * 1024 ** 3, dtype: Optional[torch.dtype] = None) -> Optional[Path]:
    """Write the model as an HF checkpoint directory (collective: every rank must call it).

    Config and tokenizer files come from ``source_dir`` (the checkpoint the model started from) when given.
    Returns ``out_dir`` on global rank 0, None elsewhere. Writes go to ``<out_dir>.tmp`` and are renamed
    at the end, so an interrupted export leaves no half checkpoint.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    writers: dict[int, _ShardWriter] = {}
    for ci, hname, t in _model_hf_tensors(chunks, arch, lambda n, p: p):
        if ci not in writers:
            writers[ci] = _ShardWriter(tmp, f"pp{pp_rank:03d}" + (f"v{ci}" if ci else ""), max_shard_bytes)
        writers[ci].add(hname, t.to(dtype) if dtype is not None else t)
    local_map: dict[str, str] = {}
    for w in writers.values():
        w.flush()
        local_map.update(w.weight_map)
    maps: list = [None] * dist.get_world_size()
    dist.all_gather_object(maps, local_map)
    if rank == 0:
        weight_map: dict[str, str] = {}
        for m in maps:
            weight_map.update(m)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        base = None
        if source_dir is not None and (Path(source_dir) / "config.json").is_file():
            base = json.loads((Path(source_dir) / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(arch, _is_value(chunks), base), indent=2))
        if source_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(source_dir) / f).is_file():
                    shutil.copy2(Path(source_dir) / f, tmp / f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out if rank == 0 else None


def iter_hf_tensors(model_dir: str | Path) -> Iterable[tuple[str, Callable[[], Tensor]]]:
    """``(name, loader)`` for every tensor of an HF checkpoint (loaders read one tensor each)."""
    rd = HFReader(model_dir)
    for name in sorted(rd.weight_map):
        yield name, (lambda n=name: rd.slice(n))
