"""Clear errors (not deep megatron tracebacks) for bad models, layouts and checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest

from dapo_mcore.models.convert import CheckpointError, HFReader
from dapo_mcore.models.hf_config import ModelConfigError, load_arch, transformer_config
from dapo_mcore.parallel.runtime import ParallelConfig, ParallelConfigError


def test_unsupported_architecture(tiny_qwen2, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_qwen2, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"unsupported architecture model_type='gpt_neox'.*llama, qwen2"):
        load_arch(d)


def test_corrupt_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }')
    with pytest.raises(ModelConfigError, match=r"config.json:2: corrupt JSON"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64}')
    with pytest.raises(ModelConfigError, match="missing required key 'num_attention_heads'"):
        load_arch(tmp_path)


def test_tp_must_divide_heads_and_vocab(tiny_qwen2):
    arch = load_arch(tiny_qwen2)   # 4 heads, 2 KV heads, vocab 320
    with pytest.raises(ModelConfigError, match="tensor parallel size 4 does not divide num_key_value_heads=2"):
        transformer_config(arch, tp=4)
    with pytest.raises(ModelConfigError, match="does not divide num_attention_heads=4"):
        transformer_config(arch, tp=3)
    import dataclasses

    odd_vocab = dataclasses.replace(arch, vocab_size=321)
    with pytest.raises(ModelConfigError, match="does not divide vocab_size=321"):
        transformer_config(odd_vocab, tp=2)
    with pytest.raises(ModelConfigError, match="pipeline parallel size 3 does not divide num_hidden_layers=4"):
        transformer_config(arch, pp=3)


def test_world_size_not_divisible():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4"):
        cfg.validate(6, cuda=False)
    cfg.validate(8, cuda=False)
    assert cfg.data_parallel_size(8) == 2
    with pytest.raises(ParallelConfigError, match="sequence_parallel requires tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True).validate(1, cuda=True)
    with pytest.raises(ParallelConfigError, match="needs pipeline_model_parallel_size >= 2"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2).validate(1, cuda=False)


def test_missing_and_corrupt_checkpoint_files(tiny_qwen2, tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        HFReader(tmp_path)
    d = tmp_path / "m"
    shutil.copytree(tiny_qwen2, d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        HFReader(d)
    # sharded checkpoint whose index names a shard that is gone
    d2 = tmp_path / "m2"
    d2.mkdir()
    (d2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors: checkpoint shard missing"):
        HFReader(d2).slice("model.norm.weight")
    with pytest.raises(CheckpointError, match="tensor 'no.such.tensor' not found"):
        HFReader(tiny_qwen2).slice("no.such.tensor")


def test_missing_training_checkpoint(tmp_path):
    from dapo_mcore.training.checkpoint import CheckpointNotFound, latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest.json").write_text('{"step": 3, "path": "iter_0000003"}')
    with pytest.raises(CheckpointNotFound, match="iter_0000003, which does not exist"):
        latest_checkpoint(tmp_path)
