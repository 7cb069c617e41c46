"""tools/sweep.py (grid expansion, skip/resume logic, emitted scripts) and tools/collect.py (tables)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evaluation.metrics_exact import METRIC_NAMES
from model.mambaad.decoder import LSSModule
from model.mambaad.scan_orders import ScanOptions, split_scan_method
from tools import collect, sweep
from util.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "configs" / "sweeps"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cartesian_grid_expansion(tmp_path: Path) -> None:
    grid = _write(
        tmp_path / "g.yaml",
        "model.scan.method: [sweep, scan, zorder, zigzag, hilbert]\n"
        "model.scan.directions: [2, 4, 8]\n"
        "model.depths: [[2,2,2,2], [3,4,6,3], [2,9,2,2]]\n",
    )
    combos = sweep.load_grid(grid)
    assert len(combos) == 5 * 3 * 3
    assert len({c.name for c in combos}) == len(combos)
    first = combos[0]
    assert first.name == "method-sweep_directions-2_depths-2-2-2-2"
    assert first.overrides == ["model.scan.method=sweep", "model.scan.directions=2", "model.depths=[2,2,2,2]"]
    assert [c.name for c in sweep.load_grid(grid)] == [c.name for c in combos]  # stable names
    cfg = load_config(REPO / "configs/mambaad_demo.py", combos[-1].overrides)
    assert cfg.model.depths == [2, 9, 2, 2] and cfg.model.scan.method == "hilbert"


def test_rows_fixed_and_grid_combine(tmp_path: Path) -> None:
    grid = _write(
        tmp_path / "g.yaml",
        "fixed: {trainer.epochs: 3}\n"
        "grid: {seed: [1, 2]}\n"
        "rows:\n"
        "  - {name: a, model.lss.kernels: [3, 5]}\n"
        "  - {name: b, model.lss.blocks: null}\n",
    )
    combos = sweep.load_grid(grid)
    assert [c.name for c in combos] == ["a_seed-1", "a_seed-2", "b_seed-1", "b_seed-2"]
    assert combos[0].overrides == ["trainer.epochs=3", "model.lss.kernels=[3,5]", "seed=1"]
    assert combos[3].overrides == ["trainer.epochs=3", "model.lss.blocks=None", "seed=2"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model.depths: []\n", "non-empty list"),
        ("grid: {seed: [1]}\ntypo: 1\n", "unknown top-level"),
        ("rows:\n  - {name: a, seed: 1}\n  - {name: a, seed: 2}\n", "distinct 'name'"),
        ("rows: 3\n", "list of mappings"),
        ("[unclosed\n", "not valid YAML"),
    ],
)
def test_grid_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(sweep.GridError, match=message) as err:
        sweep.load_grid(path)
    assert "bad.yaml" in str(err.value)


@pytest.mark.parametrize(
    "grid, count",
    [("table2_backbone_depth.yaml", 7), ("table3_scans.yaml", 12), ("table4_lss.yaml", 21), ("mmad.yaml", 8)],
)
def test_shipped_grids_expand_to_valid_configs(grid: str, count: int) -> None:
    combos = sweep.load_grid(SWEEPS / grid)
    assert len(combos) == count
    for combo in combos:
        cfg = load_config(REPO / "configs/mambaad_mvtec.py", combo.overrides)  # every key exists
        split_scan_method(cfg.model.scan.method, cfg.model.scan.directions)
        lss = cfg.model.lss
        module = LSSModule(  # each design builds and runs (tiny width)
            8,
            depth=lss.blocks or 2,
            size=4,
            kernels=lss.kernels,
            pointwise=lss.pointwise,
            residual=lss.residual,
            scan=ScanOptions(method="sweep", directions=2),
        ).eval()
        with torch.no_grad():
            assert module(torch.randn(1, 4, 4, 8)).shape == (1, 4, 4, 8)


def _fake_run(
    folder: Path, epochs: int, final_epoch: int | None, ckpt: bool = False, resolved=None, **cfg: object
) -> Path:
    """A run folder as the trainer writes it: config.json (the whole ``resolved`` config, or a few
    keys), optional metrics.json / ckpt.pth."""
    folder.mkdir(parents=True)
    config = {"trainer": {"epochs": epochs}, "model": {"depths": [3, 4, 6, 3]}, "output_dir": str(folder)}
    if resolved is not None:
        config = {**config_to_dict(resolved), "output_dir": str(folder)}
        config["trainer"]["epochs"] = epochs
    for key, value in cfg.items():
        section, leaf = key.split("__")
        config.setdefault(section, {})[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))
    if final_epoch is not None:
        mean = {m: 0.5 + 0.01 * i + 0.001 * final_epoch for i, m in enumerate(METRIC_NAMES)}
        results = {"a": mean, "b": mean, "mean": mean}
        final = {"epoch": final_epoch, "step": 1, "results": results}
        (folder / "metrics.json").write_text(json.dumps({"final": final, "history": [final]}))
    if ckpt:
        (folder / "ckpt.pth").write_bytes(b"")
    return folder


def test_run_status_skip_and_resume(tmp_path: Path) -> None:
    assert sweep.run_status(tmp_path / "none") == ("new", None)
    done = _fake_run(tmp_path / "done" / "cfg_20261125-101010", epochs=5, final_epoch=5)
    assert sweep.run_status(tmp_path / "done") == ("done", done)
    part = _fake_run(tmp_path / "part" / "cfg_20261125-101010", epochs=5, final_epoch=2, ckpt=True)
    assert sweep.run_status(tmp_path / "part") == ("partial", part)
    _fake_run(tmp_path / "crashed" / "cfg_20261125-101010", epochs=5, final_epoch=None)
    assert sweep.run_status(tmp_path / "crashed") == ("new", None)


def test_dry_run_skips_finished_and_resumes_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _write(tmp_path / "g.yaml", "seed: [1, 2, 3]\n")
    out = tmp_path / "sweep"
    demo = REPO / "configs/mambaad_demo.py"
    asked = {seed: load_config(demo, ["trainer.epochs=4", f"seed={seed}"]) for seed in (1, 2)}
    _fake_run(out / "seed-1" / "demo_20261125-101010", epochs=4, final_epoch=4, resolved=asked[1])
    part = _fake_run(
        out / "seed-2" / "demo_20261125-101010", epochs=4, final_epoch=2, ckpt=True, resolved=asked[2]
    )
    args = ["--config", str(demo), "--grid", str(grid), "--out", str(out)]
    assert sweep.main([*args, "--dry-run", "trainer.epochs=4"]) == 0
    text = capsys.readouterr().out
    assert "3 combinations, 2 to run" in text
    assert "skip seed-1" in text
    lines = [line for line in text.splitlines() if line.startswith("would run")]
    assert len(lines) == 2
    assert f"trainer.resume={part}" in lines[0] and "seed=2" in lines[0]
    assert "trainer.epochs=4" in lines[1] and f"output_dir={out / 'seed-3'}" in lines[1]
    assert not (out / "sweep.json").exists()  # a dry run writes nothing

    assert sweep.main([*args, "--emit", "slurm", "trainer.epochs=4"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in script and script.count("run.py -c configs/mambaad_demo.py") == 2
    assert sweep.main([*args, "--emit", "torchrun", "--nproc", "4", "trainer.epochs=4"]) == 0
    assert capsys.readouterr().out.count("torchrun --nproc_per_node=4 run.py") == 2


@pytest.mark.parametrize(
    ("saved", "asked", "key"),
    [
        (["trainer.epochs=1"], ["trainer.epochs=2"], "trainer.epochs: 1 -> 2"),
        (["data.root=old_data"], ["data.root=new_data"], "data.root: 'old_data' -> 'new_data'"),
        (["optim.base_lr=0.005"], ["optim.base_lr=0.001"], "optim.base_lr: 0.005 -> 0.001"),
    ],
)
def test_a_finished_run_with_other_settings_is_never_taken_as_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], saved: list[str], asked: list[str], key: str
) -> None:
    # the first sweep ran with `saved`; the same grid again into the same --out with `asked`
    # must neither skip it as finished nor rewrite sweep.json: it stops and names the keys
    grid = _write(tmp_path / "g.yaml", "seed: [1, 2]\n")
    out = tmp_path / "sweep"
    demo = REPO / "configs/mambaad_demo.py"
    for seed in (1, 2):
        cfg = load_config(demo, [*saved, f"seed={seed}"])
        run = _fake_run(out / f"seed-{seed}" / "demo_1", cfg.trainer.epochs, cfg.trainer.epochs, resolved=cfg)
        assert sweep.run_status(run.parent) == ("done", run)
    (out / "sweep.json").write_text('{"runs": "as the first sweep wrote it"}')
    args = ["--config", str(demo), "--grid", str(grid), "--out", str(out), *asked]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds runs of this grid with other settings" in err and key in err
    assert "seed-1" in err and "seed-2" in err and "--out" in err and "Traceback" not in err
    assert (out / "sweep.json").read_text() == '{"runs": "as the first sweep wrote it"}'
    assert sorted(p.name for p in (out / "seed-1").iterdir()) == ["demo_1"]  # nothing new ran
    assert sweep.main([*args[: -len(asked)], *saved]) == 0  # the original settings: all finished
    assert "2 combinations, 0 to run" in capsys.readouterr().out


def test_an_unfinished_run_with_other_settings_is_not_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a killed run (ckpt.pth, no final evaluation) would be resumed with trainer.resume=...: with
    # other settings that would mix two configurations in one run, so it is refused like a finished one
    grid = _write(tmp_path / "g.yaml", "seed: [1]\n")
    out = tmp_path / "sweep"
    demo = REPO / "configs/mambaad_demo.py"
    cfg = load_config(demo, ["trainer.epochs=4", "seed=1"])
    run = _fake_run(out / "seed-1" / "demo_1", 4, None, ckpt=True, resolved=cfg)
    assert sweep.run_status(run.parent) == ("partial", run)
    args = ["--config", str(demo), "--grid", str(grid), "--out", str(out), "optim.base_lr=0.01"]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds runs of this grid with other settings" in err and "optim.base_lr" in err
    assert "Traceback" not in err and not (out / "sweep.json").exists()


def test_a_row_runs_the_config_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _write(
        tmp_path / "g.yaml",
        "rows:\n  - {name: demo, config: configs/mambaad_demo.py}\n  - {name: default, seed: 3}\n",
    )
    combos = sweep.load_grid(grid)
    assert [(c.name, c.config) for c in combos] == [("demo", "configs/mambaad_demo.py"), ("default", None)]
    args = [
        "--config",
        str(REPO / "configs/mambaad_mvtec.py"),
        "--grid",
        str(grid),
        "--out",
        str(tmp_path / "o"),
    ]
    assert sweep.main([*args, "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("would run")]
    assert "-c configs/mambaad_demo.py" in lines[0] and "-c configs/mambaad_mvtec.py" in lines[1]
    bad = _write(tmp_path / "bad.yaml", "rows:\n  - {name: x, config: configs/no_such_method.py}\n")
    with pytest.raises(sweep.GridError, match=r"no_such_method\.py"):
        sweep.load_grid(bad)


def test_collect_tables(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    _fake_run(sweep_dir / "hilbert" / "demo_20261125-101010", 5, 5, model__scan_method="hilbert", seed__x=1)
    _fake_run(sweep_dir / "zigzag" / "demo_20261125-111111", 5, 4, model__scan_method="zigzag", seed__x=1)
    runs = collect.find_runs([sweep_dir])
    assert [label for label, _ in runs] == ["hilbert", "zigzag"]
    _fake_run(sweep_dir / "zigzag" / "demo_20261126-090000", 5, 5, model__scan_method="zigzag", seed__x=1)
    labels = [label for label, _ in collect.find_runs([sweep_dir])]
    assert labels == ["hilbert", "zigzag/demo_20261125-111111", "zigzag/demo_20261126-090000"]
    header, rows = collect.build_table(runs)
    # the state and epochs of each run, then only the differing key (not output_dir)
    assert header[:4] == ["run", "state", "epochs", "model.scan_method"]
    assert header[4:] == [*METRIC_NAMES, "mAD"]
    assert rows[0][1:4] == ["finished", "5/5", "hilbert"] and rows[1][1:4] == ["unfinished", "4/5", "zigzag"]
    expected = [100 * (0.5 + 0.01 * i + 0.005) for i in range(7)]
    assert rows[0][4:11] == pytest.approx(expected)
    assert rows[0][11] == pytest.approx(sum(expected) / 7)

    md = collect.render(header, rows, "markdown", digits=1)
    assert md.splitlines()[1].startswith("|:---|:---|:---|:---|---:")
    assert "| hilbert | finished | 5/5 | hilbert | 50.5 | 51.5 |" in md
    csv_text = collect.render(header, rows, "csv", digits=3)
    assert csv_text.splitlines()[1].startswith("hilbert,finished,5/5,hilbert,50.500,51.500")
    tex = collect.render(header, rows, "latex")
    assert "\\begin{tabular}{llllrrrrrrrr}" in tex and "model.scan\\_method" in tex


def test_collect_over_seeds_gives_mean_and_half_range(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    for method in ("hilbert", "zigzag"):
        for seed, final in ((0, 2), (1, 6)):  # metrics differ by 0.004 (x100: 0.4) between seeds
            run = sweep_dir / f"{method}_x-{seed}" / "demo_20261125-101010"  # as sweep.py names it
            _fake_run(run, 6, final, model__scan_method=method, seed__x=seed)
    header, rows = collect.average_over(*collect.build_table(collect.find_runs([sweep_dir])), "seed.x")
    assert header[:3] == ["run", "model.scan_method", "n"] and "seed.x" not in header
    assert [r[0] for r in rows] == ["hilbert", "zigzag"] and [r[2] for r in rows] == [2, 2]
    mean, spread = rows[0][3]
    assert mean == pytest.approx(100 * (0.5 + 0.004)) and spread == pytest.approx(0.2)
    assert "| hilbert | hilbert | 2 | 50.40 ± 0.20 |" in collect.render(header, rows, "markdown", digits=2)
    with pytest.raises(ValueError, match="do not differ in 'lr'"):
        collect.average_over(*collect.build_table(collect.find_runs([sweep_dir])), "lr")


def test_collect_leaves_out_unfinished_runs_and_unreadable_files_and_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir = tmp_path / "sweep"
    _fake_run(sweep_dir / "done" / "demo_20261125-101010", 5, 5, model__scan_method="hilbert")
    killed = _fake_run(sweep_dir / "killed" / "demo_20261125-101010", 5, 2, model__scan_method="zigzag")
    (killed / "status.json").write_text('{"state": "interrupted"}')
    failed = _fake_run(sweep_dir / "failed" / "demo_20261125-101010", 5, 5, model__scan_method="scan")
    (failed / "status.json").write_text('{"state": "failed"}')
    broken = _fake_run(sweep_dir / "broken" / "demo_20261125-101010", 5, 5, model__scan_method="sweep")
    (broken / "metrics.json").write_text("{not json")
    assert collect.main([str(sweep_dir), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line and not line.startswith(("#", "run,"))]
    assert [r.split(",")[:3] for r in rows] == [["done", "finished", "5/5"]]
    assert "# left out killed: interrupted, evaluated at epoch 2/5" in out
    assert "# left out failed: failed, evaluated at epoch 5/5" in out
    assert f"# left out broken: cannot read {broken}" in out and "JSONDecodeError" in out
    assert collect.main([str(sweep_dir), "--format", "csv", "--unfinished"]) == 0
    out = capsys.readouterr().out
    states = sorted(
        line.split(",")[1] for line in out.splitlines() if line.startswith(("done", "killed", "f"))
    )
    assert states == ["failed", "finished", "interrupted"]


def test_collect_paper_compares_the_same_classes_and_a_test_run_says_its_weights_epochs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an MVTec run with bottle plus a foreign class, scored by -m test on 10-epoch weights
    run = tmp_path / "mambaad_mvtec_test_1"
    run.mkdir()
    config = {"name": "mambaad_mvtec", "trainer": {"epochs": 500}, "evaluator": {"mode": "mambaad"}}
    (run / "config.json").write_text(json.dumps(config))
    ours = {m: 0.9 for m in METRIC_NAMES}
    results = {"bottle": ours, "wood_panel": {m: 0.1 for m in METRIC_NAMES}, "mean": ours}
    final = {"epoch": None, "results": results, "weights_epoch": 10}
    (run / "metrics.json").write_text(json.dumps({"final": final, "history": [final]}))
    (run / "status.json").write_text('{"state": "finished", "mode": "test"}')
    assert collect.main([str(run), "--paper", "--format", "csv", "--digits", "1"]) == 0
    out = capsys.readouterr().out
    paper = collect.load_paper()["datasets"]["mvtec"]["classes"]["bottle"]
    mean = next(line for line in out.splitlines() if line.startswith("mean,"))
    assert mean.split(",")[1:3] == ["90.0", f"{paper[0]:.1f}"]  # against bottle's, not MVTec's mean
    assert "mean over the 1 class(es) both have" in out and "not in this run: cable" in out
    assert "not in the paper, left out: wood_panel" in out and not any(
        line.startswith("wood_panel,") for line in out.splitlines()
    )
    assert "-m test of weights trained for 10 epochs" in out and "trainer.epochs=500" not in out


def test_a_test_run_records_the_epochs_of_the_weights_it_scored(tmp_path: Path) -> None:
    from util.checkpoint import trained_epochs

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"net": {}, "epoch": 7}, run / "ckpt.pth")
    torch.save({"w": torch.zeros(1)}, run / "net.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "official.pth")
    assert trained_epochs(run / "ckpt.pth") == 7 and trained_epochs(run / "net.pth") == 7
    assert trained_epochs(tmp_path / "official.pth") is None and trained_epochs(None) is None


def test_collect_mean_without_mean_row_and_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    results = {"a": {m: 0.2 for m in METRIC_NAMES}, "b": {m: 0.4 for m in METRIC_NAMES}}
    (run / "metrics.json").write_text(json.dumps({"final": {"epoch": 1, "results": results}}))
    metrics = collect.mean_metrics(run)
    assert metrics["I-AUROC"] == pytest.approx(30.0) and metrics["mAD"] == pytest.approx(30.0)
    assert collect.main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect.main([str(empty)]) == 2
    assert not math.isnan(metrics["AUPRO"])


@pytest.mark.slow
def test_real_tiny_sweep_and_collect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data.synthetic import generate_demo_dataset

    data = tmp_path / "data"
    generate_demo_dataset(data, image_size=48, n_train=2, n_test_good=1, n_test_bad=2, classes=["weave"])
    grid = _write(tmp_path / "g.yaml", "model.scan.method: [sweep, hilbert]\n")
    out = tmp_path / "sweep"
    common = [
        f"data.root={data}",
        "data.synthetic=False",
        "data.image_size=64",
        "data.batch_size=2",
        "model.teacher.name=resnet18",
        "model.depths=[2,2,2,2]",
        "model.scan.directions=2",
        "model.teacher.calibrate_batches=1",
        "trainer.epochs=1",
        "device=cpu",
    ]
    args = ["--config", str(REPO / "configs/mambaad_demo.py"), "--grid", str(grid), "--out", str(out)]
    assert sweep.main([*args, "--jobs", "2", *common]) == 0
    for name in ("method-sweep", "method-hilbert"):
        assert sweep.run_status(out / name)[0] == "done", (out / name / "stdout.txt").read_text()[-2000:]
    recorded = json.loads((out / "sweep.json").read_text())["runs"]
    assert sorted(recorded) == ["method-hilbert", "method-sweep"]
    assert recorded["method-hilbert"]["overrides"] == ["model.scan.method=hilbert"]
    assert recorded["method-hilbert"]["state"] == "finished"
    assert recorded["method-hilbert"]["run"] == str(sweep.run_status(out / "method-hilbert")[1])
    capsys.readouterr()
    assert sweep.main([*args, *common]) == 0  # everything finished: nothing runs again
    assert "2 combinations, 0 to run" in capsys.readouterr().out
    assert collect.main([str(out), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("run,state,epochs,model.scan.method,I-AUROC")
    rows = [line.split(",") for line in lines[1:]]
    assert sorted(row[3] for row in rows) == ["hilbert", "sweep"]
    assert [row[1:3] for row in rows] == [["finished", "1/1"]] * 2


def test_collect_cost_columns(tmp_path: Path) -> None:
    from util.config import save_config

    small = ["model.teacher.name=resnet18", "model.depths=[2,2,2,2]", "model.scan.directions=2"]
    for name, size in (("s64", 64), ("s128", 128)):
        run = _fake_run(tmp_path / name, 1, 1)
        save_config(
            load_config(REPO / "configs/mambaad_demo.py", [*small, f"data.image_size={size}"]),
            run / "config.json",
        )
    header, rows = collect.build_table(collect.find_runs([tmp_path]), cost=True)
    assert header[:7] == [
        "run",
        "state",
        "epochs",
        "data.image_size",
        "model.image_size",
        "Params(M)",
        "FLOPs(G)",
    ]
    by_size = {row[3]: row for row in rows}
    assert by_size[64][5] == pytest.approx(by_size[128][5], rel=0.01)  # same weights (index buffers aside)
    assert by_size[128][6] > 3.5 * by_size[64][6]  # ~4x the FLOPs at twice the side


def test_invalid_combination_stops_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _write(tmp_path / "g.yaml", "model.scan.methd: [sweep]\n")
    args = [
        "--config",
        str(REPO / "configs/mambaad_demo.py"),
        "--grid",
        str(grid),
        "--out",
        str(tmp_path / "o"),
    ]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "method-sweep" in err or "methd-sweep" in err
    assert "model.scan.method" in err  # the suggestion
    assert not (tmp_path / "o").exists()


def test_a_run_whose_config_cannot_be_read_stops_the_sweep_and_over_refuses_unfinished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _write(tmp_path / "g.yaml", "seed: [1]\n")
    out = tmp_path / "sweep"
    part = _fake_run(out / "seed-1" / "demo_20261125-101010", epochs=4, final_epoch=2, ckpt=True)
    (part / "config.json").write_text("{broken")
    args = ["--config", str(REPO / "configs/mambaad_demo.py"), "--grid", str(grid), "--out", str(out)]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "its config.json cannot be read" in err and "Traceback" not in err
    assert collect.main([str(out), "--over", "seed", "--unfinished"]) == 2
    assert "--over averages finished runs only" in capsys.readouterr().err


def test_the_table1_grid_runs_every_method_on_every_data_set_of_table_1() -> None:
    combos = sweep.load_grid(SWEEPS / "table1.yaml")
    paper = collect.load_paper()
    rows = paper["tables"]["table1"]["rows"]
    methods = ("mambaad", "rd4ad", "uniad", "simplenet", "destseg")
    expected = {f"{m}_{ds}" for ds in rows for m in methods}
    assert {c.name for c in combos} == expected
    for combo in combos:
        cfg = load_config(REPO / combo.config, combo.overrides)  # each config loads and validates
        method, dataset = combo.name.split("_")
        assert cfg.model.type == method and cfg.name == combo.name
        assert collect.paper_dataset({"name": cfg.name}, paper, Path(combo.name)) == dataset
        assert paper["methods"][method] in rows[dataset]  # collect --paper finds its Table 1 row


def test_collect_compares_only_the_settings_every_run_has() -> None:
    mambaad = {"model.type": "mambaad", "model.depths": [3, 4, 6, 3], "optim.lr": 0.0025}
    uniad = {"model.type": "uniad", "model.hidden_dim": 256, "optim.lr": 0.0001}
    assert collect.differing_keys([mambaad, uniad]) == ["model.type", "optim.lr"]
    assert collect.differing_keys([mambaad, {**mambaad, "model.depths": [2, 2, 2, 2]}]) == ["model.depths"]
