"""Real processes: torchrun (Gloo) vs one process, SIGKILL / SIGTERM and resume, guards, mixed precision."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run
from trainer.ad_trainer import ADTrainer
from util.checkpoint import load_file
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/mambaad_demo.py")
EPOCHS = 3

pytestmark = pytest.mark.slow


def _overrides(data_root: Path, out: Path, epochs: int = EPOCHS, batch: int = 4) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic=False",
        "data.image_size=64",
        f"data.batch_size={batch}",
        "data.batch_size_test=4",
        "data.num_workers=0",
        "model.teacher.name=resnet18",
        "model.depths=[2,2,2,2]",
        "model.scan.directions=4",
        f"trainer.epochs={epochs}",
        "trainer.test_every=3",
        "trainer.log_every=1",
        "trainer.deterministic=True",
        f"output_dir={out}",
        "device=cpu",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["final"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "net.pth"), load_file(b / "net.pth")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def single_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-process reference run (in a subprocess, like the others)."""
    out = tmp_path_factory.mktemp("single")
    cmd = [sys.executable, "run.py", "-c", CONFIG, *_overrides(tiny_data, out)]
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    return _only_run(out)


def _torchrun(args: list[str], script: str = "run.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def _one_process(args: list[str], script: str = "run.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def test_two_gloo_processes_finish_and_score_each_image_once(
    single_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    # end to end on 2 ranks (2 images each = the same global batch of 4): the metrics of two
    # differently trained tiny models are not compared (see the one-step test for the maths)
    out = tmp_path / "ddp"
    proc = _torchrun(["-c", CONFIG, *_overrides(tiny_data, out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = _only_run(out)
    n_test = 2 * (2 + 3)  # two classes, 2 good + 3 defective test images each
    final, reference = _final(ddp), _final(single_run)
    log = (ddp / "log.txt").read_text()
    context = f"\n--- log.txt of the 2-rank run:\n{log[-3000:]}\n--- torchrun output:\n{proc.stdout[-2000:]}"
    assert final["num_images"] == reference["num_images"] == n_test, context
    assert set(final["results"]) == set(reference["results"]) == {"washer", "weave", "mean"}, context
    assert f"{n_test} images, each scored once by 2 process(es)" in log, context
    assert "x 2 processes (torchrun)" in log and "2 process(es) x 2 image(s)" in log, context
    assert len(list((ddp / "tb").glob("events.out.tfevents.*"))) == 1, context  # rank 0 only
    files = sorted(p.name for p in ddp.iterdir() if p.is_file() and not p.name.startswith("."))
    expected = sorted(p.name for p in single_run.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files == expected, context

    # evaluation of the same weights, one image per forward pass and float32 map storage: every
    # map is computed exactly as in one process, so 2 processes must give the same numbers exactly
    # (with larger batches, per-rank batch sizes differ and the last float bits of a convolution
    # with them; float16 storage can turn that into ~1e-5 in AU-PRO)
    exact = ["data.batch_size_test=1", "evaluator.map_dtype=float32"]
    results = {}
    for launcher, name in ((_torchrun, "ddp_test"), (_one_process, "one_test")):
        test_out = tmp_path / name
        args = ["-c", CONFIG, "-m", "test", *_overrides(tiny_data, test_out), *exact]
        proc = launcher([*args, f"model.checkpoint={single_run / 'net.pth'}"])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[name] = _final(_only_run(test_out))
        assert results[name]["num_images"] == n_test
    assert results["ddp_test"]["results"] == results["one_test"]["results"]


# float64 unit roundoff is 1.1e-16. Summing per-rank shares and all-reducing adds the same
# numbers in another order, which moves a gradient by a few units of roundoff times the
# magnitudes summed; in float32 the whole network's step showed up to 2.7e-6 of a tensor's
# largest element (22 float32 units), i.e. an amplification of a few tens. In float64 that is
# ~1e-14, so 1e-9 of the largest element leaves five orders of magnitude for other CPUs,
# thread counts and libraries, while every DDP bug below moves gradients by ~1e-2 or more.
GRAD_TOL = 1e-9


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of the largest magnitude of ``want``."""
    return float((got - want).abs().max() / want.abs().max())


def _one_step(tmp_path: Path, tiny_data: Path, name: str, ranks: int, *extra: str) -> dict:
    """tests/ddp_step.py in one process or on 2 Gloo ranks; what rank 0 saved."""
    args = [
        *_overrides(tiny_data, tmp_path / "runs", epochs=1),
        "model.drop_path=0.0",
        "model.teacher.calibrate_batches=0",
        "model.scan.backend=ref",
    ]
    flags = [e for e in extra if e.startswith("--")]
    args += [e for e in extra if not e.startswith("--")]
    script, out = str(REPO / "tests" / "ddp_step.py"), tmp_path / f"{name}.pth"
    if ranks == 1:
        cmd = [sys.executable, script, *flags, CONFIG, str(out), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    else:
        proc = _torchrun([*flags, CONFIG, str(out), *args], script=script)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _grad_errors(got: dict, want: dict, floor: float = 0.0) -> dict[str, float]:
    """Each trained tensor's gradient error as a fraction of its largest element, or of ``floor``
    times the largest gradient of all tensors where that is more (tensors without a gradient:
    conv33 only)."""
    assert got.keys() == want.keys() and len(want) > 100
    largest = max(float(g.abs().max()) for g in want.values())
    errors = {}
    for name, grad in want.items():
        assert grad.dtype == torch.float64, name
        if float(grad.abs().max()) == 0:
            assert "conv33" in name, f"{name} has no gradient"
            continue
        scale = max(float(grad.abs().max()), floor * largest)
        errors[name] = float((got[name] - grad).abs().max()) / scale
    return errors


def test_one_step_on_two_gloo_ranks_equals_one_process(tiny_data: Path, tmp_path: Path) -> None:
    # equal in exact arithmetic: BatchNorm on running statistics (tests/ddp_step.py), no
    # drop-path, no teacher calibration, a mean loss over equal per-rank shares of the same four
    # different images; DDP averages the per-rank gradients. float64 makes the summation order
    # (one process vs two + all-reduce) negligible against the tolerance above.
    a = _one_step(tmp_path, tiny_data, "one", 1)
    b = _one_step(tmp_path, tiny_data, "two", 2)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
    for name, error in _grad_errors(b["grads"], a["grads"]).items():
        assert error <= GRAD_TOL, f"{name}: two ranks differ by {error:.3g} of the largest element"
    used = {name: a["grads"][name] for name in _grad_errors(b["grads"], a["grads"])}

    # the same comparison catches what a broken data-parallel step would give: no all-reduce
    # (or rank 1's share dropped: rank 0 keeps the gradient of its own half) and a sum of the
    # ranks' gradients instead of their mean; each moves nearly every tensor far past GRAD_TOL
    bugs = {
        "no all-reduce": b["local"],
        "sum instead of mean": {name: 2 * grad for name, grad in b["grads"].items()},
    }
    for bug, grads in bugs.items():
        caught = [name for name in used if _relative_error(grads[name], used[name]) > 1e3 * GRAD_TOL]
        assert len(caught) >= 0.9 * len(used), f"{bug}: only {len(caught)}/{len(used)} tensors differ"


def test_sync_batchnorm_on_two_gloo_ranks_equals_one_process(tiny_data: Path, tmp_path: Path) -> None:
    # BatchNorm in training mode normalises with batch statistics: two ranks equal one process
    # on the whole batch only when the statistics are pooled (trainer.sync_bn, the default),
    # in exact arithmetic; float64 and GRAD_TOL as above. Without it each rank normalises its
    # two images alone, which moves every gradient upstream of a BatchNorm layer. The bias of a
    # convolution right before a BatchNorm in training mode has no gradient in exact arithmetic
    # (the batch mean removes it): both sides hold float64 roundoff there (~1e-15 of the largest
    # gradient), so errors are measured against at least 1e-3 of the largest gradient.
    one = _one_step(tmp_path, tiny_data, "one", 1, "--train-bn")
    synced = _one_step(tmp_path, tiny_data, "synced", 2, "--train-bn")
    assert synced["sync_bn_layers"] > 0 and one["sync_bn_layers"] == 0
    assert synced["loss"] == pytest.approx(one["loss"], rel=1e-12)
    for name, error in _grad_errors(synced["grads"], one["grads"], floor=1e-3).items():
        assert error <= GRAD_TOL, f"{name}: two synced ranks differ by {error:.3g} of the largest element"

    apart = _one_step(tmp_path, tiny_data, "apart", 2, "--train-bn", "trainer.sync_bn=False")
    assert apart["sync_bn_layers"] == 0
    errors = _grad_errors(apart["grads"], one["grads"], floor=1e-3)
    moved = [name for name, error in errors.items() if error > 1e3 * GRAD_TOL]
    assert len(moved) >= 0.5 * len(errors), f"per-rank statistics moved only {len(moved)}/{len(errors)}"


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_line(out: Path, needle: str, proc: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
        if runs and (runs[0] / "log.txt").is_file() and needle in (runs[0] / "log.txt").read_text():
            return runs[0]
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{needle!r} never appeared in the log")


def _resume(args: list[str], run_dir: Path) -> None:
    cmd = [sys.executable, "run.py", *args, f"trainer.resume={run_dir}"]
    resumed = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    single_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    proc = _start(["-c", CONFIG, *_overrides(tiny_data, out)])
    run_dir = _wait_for_line(out, "epoch 2 step 3 ", proc)  # 2 steps per epoch: inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_file(run_dir / "ckpt.pth")["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()
    _resume(["-c", CONFIG, *_overrides(tiny_data, out)], run_dir)
    assert "resumed" in (run_dir / "log.txt").read_text()
    _assert_same_weights(run_dir, single_run)
    assert _final(run_dir)["results"] == _final(single_run)["results"]


def test_sigterm_saves_mid_epoch_and_resume_equals_uninterrupted(
    single_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "terminated"
    args = ["-c", CONFIG, *_overrides(tiny_data, out), "trainer.keep_checkpoints=3"]
    proc = _start(args)
    run_dir = _wait_for_line(out, "epoch 2 step 3 ", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received: saved a checkpoint" in output and f"trainer.resume={run_dir}" in output
    state = load_file(run_dir / "ckpt.pth")
    assert state["epoch"] == 1 and state["batches_done"] >= 1
    _resume(args, run_dir)
    assert "after 1 batches" in (run_dir / "log.txt").read_text() or state["batches_done"] > 1
    _assert_same_weights(run_dir, single_run)
    assert _final(run_dir)["results"] == _final(single_run)["results"]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt_*.pth"))
    assert len(kept) == 3 and kept[-1].startswith("ckpt_e00003"), kept


def _trainer(tiny_data: Path, out: Path, *extra: str) -> ADTrainer:
    cfg = load_config(
        CONFIG, [*_overrides(tiny_data, out, epochs=1, batch=2), "trainer.test_every=1", *extra]
    )
    return ADTrainer(cfg)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tiny_data: Path, tmp_path: Path, amp: str) -> None:
    trainer = _trainer(tiny_data, tmp_path, f"trainer.amp={amp}")
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    before = {k: v.clone() for k, v in trainer.model.net_s.state_dict().items()}
    results = trainer.train()
    assert trainer.global_step == 4
    changed = [k for k, v in trainer.model.net_s.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no decoder weight changed"
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert 0.0 <= results["mean"]["I-AUROC"] <= 1.0


def test_accumulation_counts_optimizer_steps(tiny_data: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_data, tmp_path, "trainer.accumulate=2")
    assert trainer.micro_batch == 1
    trainer.train()
    assert trainer.global_step == 4  # 8 images / batch 2 = 4 optimiser steps of 2 micro-batches
    with pytest.raises(ValueError, match="divisible"):
        _trainer(tiny_data, tmp_path / "bad", "trainer.accumulate=3")


def test_non_finite_loss_names_step_images_and_hint(tiny_data: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_data, tmp_path, "trainer.amp=fp16")
    trainer.loss_fn = lambda ft, fs: fs[0].float().mean() * float("nan")
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "step 1" in message and ".png" in message and "optim.base_lr" in message and "amp" in message
    assert "no checkpoint has been written yet" in message and "ckpt.pth" not in message


def test_cli_stop_message_and_exit_code(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.ad_trainer import ADTrainer

    def stop_at_once(self: ADTrainer) -> None:
        self.stop.signal = signal.SIGTERM
        return original(self)

    original = ADTrainer.train
    monkeypatch.setattr(ADTrainer, "train", stop_at_once)
    args = ["-c", CONFIG, *_overrides(tiny_data, tmp_path, epochs=1, batch=2)]
    assert run.main(args) == 128 + signal.SIGTERM
    state = load_file(_only_run(tmp_path) / "ckpt.pth")
    assert state["epoch"] == 0 and state["batches_done"] == 1


def test_out_of_memory_suggests_smaller_batch_or_accumulation(tiny_data: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_data, tmp_path)

    def exhausted(imgs: torch.Tensor) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    trainer.net.forward = exhausted
    with pytest.raises(RuntimeError, match=r"out of memory .*data\.batch_size.*trainer\.accumulate=K"):
        trainer.train()
