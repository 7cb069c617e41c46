"""Nothing a user is handed runs code: crafted checkpoints, run folders and meta.json paths."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.default_ad import DefaultAD
from data.meta import DataError, load_meta
from mambaad import load_model
from model.build import build_model
from model.teacher import build_teacher, load_teacher_checkpoint
from util.checkpoint import CheckpointError, load_file
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import predict  # noqa: E402
import prepare_data  # noqa: E402

CONFIG = REPO / "configs/mambaad_demo.py"
SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


class _System:
    """Unpickling this calls ``os.system`` (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


class _Exec:
    """Unpickling this runs Python source through ``builtins.exec``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(load_config(CONFIG, SMALL), logging.getLogger("test_security")).state_dict()


@pytest.mark.parametrize("payload", [_System, _Exec])
def test_crafted_checkpoint_runs_no_code_and_is_refused_cleanly(
    payload: type, tiny_state: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pth"
    torch.save({"net": tiny_state, "extra": payload(marker)}, crafted)
    with pytest.raises(CheckpointError, match=r"crafted\.pth contains objects outside the allow-list") as err:
        load_file(crafted)
    assert "nothing was unpickled" in str(err.value) and "\n" not in str(err.value)
    assert "system" in str(err.value) or "exec" in str(err.value)
    with pytest.raises(CheckpointError, match="allow-list"):
        load_model(crafted, config=CONFIG, overrides=SMALL)
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(CONFIG, SMALL), run / "config.json")
    torch.save({"net": tiny_state, "extra": payload(marker)}, run / "ckpt.pth")
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = predict.main(["--checkpoint", str(run), "--input", str(image), "--output", str(tmp_path / "out")])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("error: checkpoint") and "ckpt.pth contains objects outside" in lines[-1]
    assert not any("CheckpointError" in line for line in lines)  # no traceback
    assert not marker.exists(), "unpickling the crafted checkpoint ran its code"


def test_crafted_teacher_file_is_refused_cleanly(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    crafted = tmp_path / "resnet18.pth"
    teacher = build_teacher("resnet18", pretrained=False, log=lambda _: None)
    torch.save({**teacher.state_dict(), "x": _Exec(marker)}, crafted)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth contains objects outside the allow-list"):
        load_teacher_checkpoint(teacher, crafted, log=lambda _: None)
    assert not marker.exists()


def test_full_training_checkpoint_loads_weights_only_and_resumes(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.ad_trainer import ADTrainer

    overrides = [
        *SMALL,
        f"data.root={tiny_data}",
        "data.synthetic=False",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.teacher.calibrate_batches=0",
        "trainer.amp=fp16",  # a GradScaler with state
        f"output_dir={tmp_path}",
        "device=cpu",
    ]
    first = ADTrainer(load_config(CONFIG, overrides))
    for p in first.model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.01)
    first.optimizers["main"].step()
    first.schedulers["main"].step()
    first.global_step = 1
    first.history = [{"epoch": 1, "step": 1, "num_images": 5, "results": {"mean": {"mAD": np.float64(0.5)}}}]
    first._checkpoint(1)
    numpy_state = np.random.get_state()
    saved_optimizer = first.optimizers["main"].state_dict()
    first.writer.close()
    if getattr(first, "lock", None) is not None:
        first.lock.release()

    calls: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    np.random.seed(123)  # resuming must restore the saved NumPy stream
    resumed = ADTrainer(load_config(CONFIG, [*overrides, f"trainer.resume={first.run_dir}"]))
    assert calls and all(flag is True for flag in calls), calls
    assert resumed.start_epoch == 2 and resumed.global_step == 1
    assert resumed.history[0]["results"]["mean"]["mAD"] == 0.5
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    milestones = resumed.schedulers["main"].state_dict()["milestones"]
    assert milestones == first.schedulers["main"].state_dict()["milestones"]
    restored = resumed.optimizers["main"].state_dict()
    for key, value in saved_optimizer["state"][0].items():
        assert torch.equal(torch.as_tensor(restored["state"][0][key]), torch.as_tensor(value)), key
    state = np.random.get_state()
    assert state[0] == numpy_state[0] and np.array_equal(state[1], numpy_state[1])
    resumed.writer.close()
    if getattr(resumed, "lock", None) is not None:
        resumed.lock.release()


def test_authors_checkpoint_layout_loads_weights_only(
    tiny_state: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADer's ckpt.pth layout (what the authors' trainer saves) loads under the allow-list."""
    from model.mambaad.official import load_weights

    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.005)
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    path = tmp_path / "mambaad_mvtec.pth"
    timm_scheduler = {"t_initial": 500, "lr_min": 1e-6, "noise_range_t": None, "base_values": [0.005]}
    torch.save(
        {
            "net": {f"module.{k}": v for k, v in tiny_state.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": timm_scheduler,
            "scaler": None,
            "iter": 100,
            "epoch": 1,
            "metric_recorder": {"mAUROC_sp_max_bottle": [np.float64(99.5), np.float32(98.0)]},
            "total_time": 12.5,
        },
        path,
    )
    flags: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **kw: flags.append(kw.get("weights_only")) or real_load(*a, **kw)
    )
    model = build_model(load_config(CONFIG, SMALL), logging.getLogger("test_security"))
    report = load_weights(model, path)
    assert report.ok and flags == [True]
    for key, value in tiny_state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_run_folder_does_not_execute_the_config_file_it_names(tiny_state: dict, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "run" / "evil_config.py"
    evil.parent.mkdir()
    evil.write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('pwned')\n"
        "from configs.mambaad_demo import MambaADDemo\n\n\n"
        "class Evil(MambaADDemo):\n    pass\n"
    )
    cfg = load_config(CONFIG, SMALL)
    saved = json.loads(json.dumps(cfg.to_dict(), default=str))
    saved["config_file"] = str(evil)
    saved["derive"] = 1  # a saved key can only set values, never replace the config's methods
    (evil.parent / "config.json").write_text(json.dumps(saved))
    torch.save(tiny_state, evil.parent / "net.pth")

    model = load_model(evil.parent)
    assert not marker.exists(), "loading the run folder executed the config file it names"
    assert model.cfg.model.depths == [2, 2, 2, 2] and model.cfg.data.image_size == 64
    assert model.cfg.data.synthetic_args.n_train == 60  # restored though configs/defaults.py lacks it
    assert callable(model.cfg.derive)
    out = tmp_path / "out"
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", str(evil.parent), "--input", str(image), "--output", str(out)]) == 0
    assert not marker.exists()
    assert (out / "in.npy").is_file()


def _data_root(tmp_path: Path, img_path: str) -> Path:
    """A one-class data root listing ``img_path`` as its second training image; a real image sits outside."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "outside.png")
    root = tmp_path / "root"
    (root / "wood").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "wood" / "ok.png")
    item = {"cls_name": "wood", "specie_name": "good", "anomaly": 0, "mask_path": ""}
    meta = {
        "train": {"wood": [{**item, "img_path": "wood/ok.png"}, {**item, "img_path": img_path}]},
        "test": {"wood": [{**item, "img_path": "wood/ok.png"}]},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("kind", ["parent", "nested", "absolute", "system"])
def test_meta_paths_outside_the_root_are_refused(tmp_path: Path, kind: str) -> None:
    img_path = {
        "parent": "../outside.png",
        "nested": "wood/../../outside.png",
        "absolute": str(tmp_path / "outside.png"),
        "system": "../../../../../../../etc/passwd",
    }[kind]
    root = _data_root(tmp_path, img_path)
    with pytest.raises(DataError) as err:
        load_meta(root, log=lambda _: None)
    message = str(err.value)
    assert "['train']['wood'][1]" in message and repr(img_path) in message and "meta.json" in message
    if kind == "absolute":
        assert "data.allow_absolute_paths=True" in message
    with pytest.raises(DataError, match=r"\['train'\]\['wood'\]\[1\]"):
        DefaultAD(root, "train", image_size=16, log=lambda _: None)


def test_absolute_paths_need_the_documented_opt_in(tmp_path: Path) -> None:
    assert load_config(REPO / "configs/defaults.py").data.allow_absolute_paths is False
    root = _data_root(tmp_path, str(tmp_path / "outside.png"))
    ds = DefaultAD(root, "train", image_size=16, log=lambda _: None, allow_absolute_paths=True)
    assert ds[1]["img_path"] == str(tmp_path / "outside.png")
    assert float(ds[1]["img"].max()) > float(ds[0]["img"].max())  # the bright image outside was read
    escaping = _data_root(tmp_path / "other", "../outside.png")
    with pytest.raises(DataError, match="leaves the data root"):  # the opt-in is for absolute paths only
        DefaultAD(escaping, "train", image_size=16, log=lambda _: None, allow_absolute_paths=True)


def test_prepare_data_check_reports_paths_outside_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _data_root(tmp_path, "../outside.png")
    args = ["--dataset", "mvtec", "--root", str(root), "--check", "--no-progress"]
    assert prepare_data.main(args) == 1
    err = capsys.readouterr().err
    assert "['train']['wood'][1]" in err and "'../outside.png'" in err and "leaves the data root" in err

    absolute = _data_root(tmp_path / "abs", str(tmp_path / "abs" / "outside.png"))
    args = ["--dataset", "mvtec", "--root", str(absolute), "--check", "--no-progress"]
    assert prepare_data.main(args) == 1
    assert "--allow-absolute-paths" in capsys.readouterr().err
    assert prepare_data.main([*args, "--allow-absolute-paths"]) == 0
    assert "all files present and readable" in capsys.readouterr().out
