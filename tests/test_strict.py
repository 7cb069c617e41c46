"""Bad input ends in one clean paragraph before any work; failed runs are marked; one process a run folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import model.ops.selective_scan
import run
from trainer.run_folder import RunLock, read_status, write_status
from util.checkpoint import atomic_save
from util.errors import DiskFullError, UserError, is_disk_full, report
from util.progress import Progress

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/mambaad_demo.py")


def _overrides(data_root: Path, out: Path, epochs: int = 1) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic=False",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "model.teacher.name=resnet18",
        "model.depths=[2,2,2,2]",
        "model.scan.directions=2",
        f"trainer.epochs={epochs}",
        "trainer.log_every=1",
        f"output_dir={out}",
        "device=cpu",
    ]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=-1", "trainer.epochs"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.epochs=1.5", "trainer.epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.scan.directions=3", "model.scan.directions"),
        ("model.scan.method=zigzag+spiral", "model.scan.method"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("model.depths=[1,2,2,2]", "model.depths"),
        ("data.image_size=80", "data.image_size"),  # the model would refuse it only when built
        ("data.image_size=32", "data.image_size"),
        # values that trained to chance without a word (issue 26)
        ("loss.weight=-5", "loss.weight"),
        ("loss.weight=0", "loss.weight"),
        ("scheduler.gamma=-1", "scheduler.gamma"),
        ("scheduler.gamma=0", "scheduler.gamma"),
        ("scheduler.decay_at=1.5", "scheduler.decay_at"),
        ("optim.lr=0", "optim.lr"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("model.scan.backend=cuda_fast", "model.scan.backend"),  # failed at the first step before
        ("evaluator.mode=official", "evaluator.mode"),
        ("evaluator.map_dtype=float64", "evaluator.map_dtype"),
        ("model.sigma=-1", "model.sigma"),
    ],
)
def test_bad_config_values_stop_before_any_work(
    override: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["-c", CONFIG, f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "a run folder was created for a config that cannot run"


@pytest.mark.parametrize(
    ("backend", "reason"),
    [("mamba_ssm", "needs a CUDA device"), ("triton", "needs a CUDA device")],
)
def test_a_scan_backend_this_machine_cannot_run_stops_before_any_work(
    backend: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would run triton on CPUs
    from model.ops import selective_scan_triton

    monkeypatch.setattr(selective_scan_triton, "INTERPRET", False)
    model.ops.selective_scan._triton_available.cache_clear()
    try:
        args = ["-c", CONFIG, f"output_dir={tmp_path}", "device=cpu", f"model.scan.backend={backend}"]
        assert run.main(args) == 2
    finally:
        model.ops.selective_scan._triton_available.cache_clear()
    err = capsys.readouterr().err
    assert f"model.scan.backend={backend} cannot run here: it {reason}" in err and "Traceback" not in err
    assert "model.scan.backend=auto" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "a run folder was created for a config that cannot run"


def test_data_error_is_one_paragraph_and_leaves_no_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "-c",
        CONFIG,
        f"data.root={tmp_path / 'missing'}",
        "data.synthetic=False",
        f"output_dir={tmp_path}/o",
    ]
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert "data.root" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "o").glob("*")), "set-up failed, yet a run folder is left"
    assert run.main([*args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_report_exit_codes_and_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from util.config import ConfigError

    log = logging.getLogger("test_report")
    handler = logging.FileHandler(tmp_path / "log.txt")
    log.addHandler(handler)
    try:
        assert report(ConfigError("bad key"), log=log) == 2
        assert report(UserError("bad data")) == 1
        try:
            raise RuntimeError("a bug")
        except RuntimeError as bug:
            assert report(bug) == 1
    finally:
        log.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "error: bad key" in err and "Traceback" in err  # the bug keeps its traceback
    assert "bad key" in (tmp_path / "log.txt").read_text()


@pytest.fixture(scope="module")
def finished_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One epoch of a tiny model; returns its run folder and the overrides it was trained with."""
    out = tmp_path_factory.mktemp("runs")
    args = _overrides(tiny_data, out)
    assert run.main(["-c", CONFIG, *args]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, args


def test_status_file_and_lock_of_a_finished_run(finished_run: tuple[Path, list[str]]) -> None:
    run_dir, _ = finished_run
    assert read_status(run_dir)["state"] == "finished"
    RunLock(run_dir).acquire().release()  # released at the end: a new process may take it


def test_resume_with_other_values_is_refused_listing_the_keys(
    finished_run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, args = finished_run
    resume = [*args, f"trainer.resume={run_dir}"]
    assert run.main(["-c", CONFIG, *resume, "data.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 4 -> 2" in err and "optim.lr" in err and "Traceback" not in err
    # safe keys change only with the explicit flag, unsafe ones never
    assert run.main(["-c", CONFIG, *resume, "trainer.epochs=2"]) == 2
    assert "trainer.resume_changes=True" in capsys.readouterr().err
    assert run.main(["-c", CONFIG, *resume, "model.depths=[3,2,2,2]", "trainer.resume_changes=True"]) == 2
    assert "model.depths" in capsys.readouterr().err
    assert not (run_dir / "resume_changes.json").exists()
    # a refused resume changes nothing: the finished run stays finished (it was marked failed)
    assert read_status(run_dir)["state"] == "finished"
    assert "resume refused or failed before training started" in (run_dir / "log.txt").read_text()


def test_a_refused_resume_of_a_folder_that_is_no_run_leaves_it_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    out = tmp_path / "out"
    assert run.main(["-c", CONFIG, f"output_dir={out}", f"trainer.resume={folder}"]) == 2
    err = capsys.readouterr().err
    assert f"trainer.resume={folder} holds no ckpt.pth" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]  # no .lock left behind (it was)
    assert not out.exists()


def test_resume_with_more_epochs_records_the_change(
    finished_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    run_dir, args = finished_run
    resume = [*args, f"trainer.resume={run_dir}", "trainer.epochs=2", "trainer.resume_changes=True"]
    assert run.main(["-c", CONFIG, *resume]) == 0
    record = json.loads((run_dir / "resume_changes.json").read_text())
    assert record[-1]["changes"] == {"trainer.epochs": [1, 2]}
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["trainer"]["epochs"] == 2
    assert saved["scheduler"]["milestones"] == [1]  # derived from the old epochs, as the checkpoint's
    assert read_status(run_dir)["state"] == "finished"


def test_resume_writes_a_missing_config_json(finished_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    run_dir, args = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    (copy / "config.json").unlink()
    assert run.main(["-c", CONFIG, *args, f"trainer.resume={copy}"]) == 0
    assert json.loads((copy / "config.json").read_text())["data"]["batch_size"] == 4
    assert "had no config.json; writing this run's config there" in (copy / "log.txt").read_text()


def test_second_process_on_a_run_folder_is_refused_and_stale_locks_reclaimed(
    finished_run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, args = finished_run
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from trainer.run_folder import RunLock; "
            f"lock = RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.main(["-c", CONFIG, *args, f"trainer.resume={run_dir}"]) == 1
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "in use" in err
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file stays, and is taken over
    assert f"process {holder.pid}" in (run_dir / ".lock").read_text()
    RunLock(run_dir).acquire().release()


def test_failure_during_training_is_logged_and_marked(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.ad_trainer import ADTrainer

    def broken(self: ADTrainer, epoch: int | None = None) -> None:
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(ADTrainer, "evaluate", broken)
    assert run.main(["-c", CONFIG, *_overrides(tiny_data, tmp_path)]) == 1
    (run_dir,) = list(tmp_path.iterdir())
    assert "evaluation exploded" in (run_dir / "log.txt").read_text()
    status = read_status(run_dir)
    assert status["state"] == "failed" and "evaluation exploded" in status["error"]
    assert "evaluation exploded" in capsys.readouterr().err


def test_disk_full_names_the_file_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(4)}, target)

    def full_device(**kwargs: object) -> tuple[int, str]:
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / ".ckpt.pth.x.tmp")

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(tempfile, "mkstemp", full_device)
    with pytest.raises(DiskFullError) as info:
        atomic_save({"a": torch.zeros(1 << 20)}, target)
    assert str(info.value).startswith(f"no space left on device while writing {target}")
    assert "previous ckpt.pth is intact" in str(info.value)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(4))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing")
    assert is_disk_full(wrapped) and is_disk_full(OSError(errno.ENOSPC, "x"))
    assert not is_disk_full(RuntimeError("shape mismatch"))


def test_progress_writes_lines_not_bars_when_not_a_terminal() -> None:
    lines: list[str] = []
    items = list(Progress(range(5), "test", lambda fmt, *a: lines.append(fmt % a), terminal=False, every_s=0))
    assert items == list(range(5))
    assert len(lines) == 6 and lines[-1].startswith("test: 5/5 in")
    quiet: list[str] = []
    list(Progress(range(5), "test", lambda fmt, *a: quiet.append(fmt % a), terminal=False))
    assert len(quiet) == 1  # only the closing line within a minute


def test_a_run_that_died_before_its_first_checkpoint_is_marked_failed_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as SIGKILL leaves it during the first epoch: config.json, status "running", no ckpt.pth
    run_dir = tmp_path / "runs" / "demo_20261207-010101"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    write_status(run_dir, "running", mode="train")
    args = ["-c", CONFIG, f"output_dir={tmp_path / 'runs'}", f"trainer.resume={run_dir}"]
    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert "it stopped before its first checkpoint, so there is nothing to resume" in err
    assert "start the run again without trainer.resume" in err and "Traceback" not in err
    status = read_status(run_dir)
    assert status["state"] == "failed" and "start the run again" in status["error"]


def test_model_and_device_errors_are_one_paragraph(
    finished_run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, args = finished_run
    # -m test on a run folder: its weights file is taken (it said the folder did not exist)
    test = ["-c", CONFIG, "-m", "test", *args, f"output_dir={tmp_path / 't'}", f"model.checkpoint={run_dir}"]
    assert run.main(test) == 0
    (tested,) = (tmp_path / "t").iterdir()
    trained = json.loads((run_dir / "metrics.json").read_text())["final"]["epoch"]  # 1, or 2 once resumed
    assert json.loads((tested / "metrics.json").read_text())["final"]["weights_epoch"] == trained
    capsys.readouterr()
    cases = [
        (["model.depths=[3,4,6,3]"], "does not match the configured model"),  # another architecture
        (["model.teacher.name=resnet18x"], "model.teacher.name='resnet18x' is no timm model; did you mean"),
        (["device=cuda"] if not torch.cuda.is_available() else [], "CUDA is not available here"),
    ]
    for extra, message in cases:
        if not extra:
            continue
        out = tmp_path / "o"
        assert run.main([*test[:-2], *extra, f"output_dir={out}", f"model.checkpoint={run_dir}"]) in (1, 2)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() or not any(out.iterdir())
