"""torchrun worker for tests/test_launch.py (gloo on CPU): every rank joins a gloo group and all-reduces once;
rank FAIL_RANK then raises inside dapo_mcore code (a config value the stage table's critic refuses), the
others block in a second all-reduce until torchrun stops them. Errors are recorded the way ``_worker`` records
them (``dapo_mcore.run.launch.recording_errors``).

  fail_worker.py LOG_DIR FAIL_RANK
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dapo_mcore.critic.train import CriticConfig, run_train_critic
from dapo_mcore.run.launch import recording_errors

log_dir, fail_rank = Path(sys.argv[1]), int(sys.argv[2])
with recording_errors(log_dir):
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == fail_rank:
        run_train_critic(CriticConfig(init_path=""), log_dir / "no-mc", log_dir / "no-out")
    dist.all_reduce(t)          # the other ranks wait here for the failed one
    dist.destroy_process_group()
