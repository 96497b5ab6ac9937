"""A small chain-task completer for tests, benchmarks and demos of the rollout stages: a tiny HF
checkpoint briefly fine-tuned on chain-task solutions (with a systematic carry error), so its
samples have real step structure, end with EOS and are sometimes right and sometimes wrong."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint
from dapo_mcore.tasks.chain import make_problems


def build_toy_completer(out_dir: str | Path, steps: int = 150, model: TinyModelConfig | None = None,
                        seed: int = 0, batch: int = 32, lr: float = 3e-3, carry_error_rate: float = 0.5,
                        n_ops: tuple[int, int] = (3, 5)) -> Path:
    """Build (or reuse, if ``out_dir`` already holds the same build) the toy completer."""
    out = Path(out_dir)
    model = model or TinyModelConfig()
    stamp = {"steps": steps, "model": model.__dict__, "seed": seed, "batch": batch, "lr": lr,
             "carry_error_rate": carry_error_rate, "n_ops": list(n_ops)}
    marker = out / "toy_completer.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    probs = make_problems(2000, seed=seed + 1000, n_ops=n_ops, prefix="train")
    texts = [p.prompt + p.solution(carry_error_rate, rng) for p in probs]
    build_tiny_checkpoint(out, texts, model, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    lm.train()
    for step in range(steps):
        idx = torch.randint(len(enc), (batch,), generator=g).tolist()
        L = max(len(enc[i]) for i in idx)
        ids = torch.full((batch, L), tok.pad_token_id)
        labels = torch.full((batch, L), -100)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            labels[r, :len(enc[i])] = torch.tensor(enc[i])
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        loss = lm(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    lm.save_pretrained(str(out), safe_serialization=True)
    marker.write_text(json.dumps(stamp))
    return out


def write_chain_problems(path: str | Path, n: int, seed: int = 0, n_ops: tuple[int, int] = (3, 5)) -> Path:
    """Write ``n`` chain-task problems as a JSONL problem set."""
    path = Path(path)
    path.write_text("".join(json.dumps(p.to_record()) + "\n" for p in make_problems(n, seed, n_ops)))
    return path
