"""A deeper critic initialisation: the policy's checkpoint with extra transformer layers that start as the
identity, so the critic begins with the policy's features and has more layers to learn step checks with.

Each new layer is a copy of an existing one (``copy_from``, default: the last) whose attention output and MLP
down projections are zero, so at initialisation its residual contribution is exactly 0 and the deeper model
computes what the policy computes; training moves the zeroed projections first. New layers go on top.

``python -m dapo_mcore.critic.deepen --src POLICY_HF --out CRITIC_INIT --extra-layers 2`` (then
``model.critic_init=CRITIC_INIT``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

ZEROED = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


def deepen_checkpoint(src: str | Path, out: str | Path, extra_layers: int, copy_from: int = -1) -> Path:
    """Write ``src`` with ``extra_layers`` identity-initialised layers on top to ``out``; returns ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if extra_layers < 1:
        raise ValueError(f"extra_layers must be >= 1, got {extra_layers}")
    cfg = AutoConfig.from_pretrained(str(src))
    n = cfg.num_hidden_layers
    if not -n <= copy_from < n:
        raise ValueError(f"copy_from={copy_from}: the model has {n} layers")
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    cfg.num_hidden_layers = n + extra_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[copy_from]] * extra_layers
    deep = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = base.state_dict()
    new = {}
    src_layer = copy_from % n
    for k, v in deep.state_dict().items():
        if k in sd:
            new[k] = sd[k]
            continue
        parts = k.split(".")
        i = parts.index("layers")
        if int(parts[i + 1]) < n:
            raise KeyError(f"{k}: missing from {src}")
        rest = ".".join(parts[i + 2:])
        t = sd[".".join(parts[:i + 1] + [str(src_layer), rest])].clone()
        new[k] = torch.zeros_like(t) if rest in ZEROED else t
    deep.load_state_dict(new)
    out = Path(out)
    deep.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Deeper critic init: extra identity-initialised layers on a policy.")
    ap.add_argument("--src", required=True, help="policy HF checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra-layers", type=int, default=2)
    ap.add_argument("--copy-from", type=int, default=-1, help="layer whose weights the new layers copy")
    a = ap.parse_args(argv)
    print(deepen_checkpoint(a.src, a.out, a.extra_layers, a.copy_from))


if __name__ == "__main__":
    main()
