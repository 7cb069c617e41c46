"""GPU-path decisions that a CPU can check: process-group options, per-device RNG state,
numeric modes (fast CUDA, fp32 evaluation) and the config keys that select them."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from configs.defaults import MambaADDefaults
from trainer import rng
from trainer.base import TrainerBase
from util import distributed
from util.config import ConfigError


def test_process_group_gets_timeout_and_device_id(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    ctx = distributed.init_distributed("cuda", timeout_s=7200)
    assert ctx.device == torch.device("cuda", 1)
    assert calls[0] == ("set_device", torch.device("cuda", 1))
    kw = calls[1][1]
    assert kw["backend"] == "nccl"
    assert kw["timeout"] == datetime.timedelta(seconds=7200)
    assert kw["device_id"] == torch.device("cuda", 1)
    calls.clear()
    distributed.init_distributed("cpu", timeout_s=30)
    kw = calls[0][1]
    assert kw["backend"] == "gloo" and kw["device_id"] is None
    assert kw["timeout"] == datetime.timedelta(seconds=30)


def test_rng_state_keeps_one_gpu_and_reads_old_lists(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = rng.rng_state()
    assert int(state["cuda"][0]) == 7  # this process's GPU only, not a list over all GPUs
    rng.set_rng_state(state)
    old = {**state, "cuda": [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]}
    rng.set_rng_state(old)  # a checkpoint of an earlier version, saved on 2 GPUs
    one = {**state, "cuda": [torch.tensor([12], dtype=torch.uint8)]}
    rng.set_rng_state(one)  # saved on 1 GPU, resumed on device 1: the only entry
    assert restored == [7, 11, 12]


def test_fast_cuda_and_full_fp32_restore_flags():
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
        rng.enable_fast_cuda()
        assert torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        rng.enable_fast_cuda(tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        a = torch.randn(4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16
            with rng.full_fp32("cpu"):
                assert (a @ a).dtype == torch.float32
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert (a @ a).dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved


@pytest.mark.parametrize(("amp_eval", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_evaluation_precision_follows_amp_eval(amp_eval, expected):
    cfg = MambaADDefaults()
    cfg.trainer.amp = "bf16"
    cfg.trainer.amp_eval = amp_eval
    fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    fake._autocast = lambda: TrainerBase._autocast(fake)
    a = torch.randn(4, 4)
    with TrainerBase._eval_precision(fake):
        assert (a @ a).dtype == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainer.fast_cuda", "yes"),
        ("trainer.tf32", "fast"),
        ("trainer.amp_eval", 2),
        ("trainer.dist_timeout", 0),
    ],
)
def test_new_trainer_keys_are_validated(key, value):
    cfg = MambaADDefaults()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()
