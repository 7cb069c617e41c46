"""The paper's published numbers (configs/paper_results.json) and ``tools/collect.py --paper``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from evaluation.metrics import METRIC_MODES
from evaluation.metrics_exact import METRIC_NAMES
from tools import collect, sweep
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
PAPER = collect.load_paper()


def test_paper_file_is_consistent() -> None:
    assert PAPER["metrics"] == list(METRIC_NAMES)
    assert PAPER["evaluation"]["mode"] in METRIC_MODES
    table1 = PAPER["tables"]["table1"]["rows"]
    for ds, entry in PAPER["datasets"].items():
        assert (REPO / "configs" / f"{entry['config']}.py").is_file(), ds
        assert entry["source"]["mean"] and entry["source"]["classes"]
        rows = list(entry["classes"].values())
        assert all(len(r) == 7 for r in [entry["mean"], *rows])
        for i, mean in enumerate(entry["mean"]):  # the printed means are the class averages, rounded
            assert abs(sum(r[i] for r in rows) / len(rows) - mean) <= 0.1, (ds, METRIC_NAMES[i])
        if ds in table1:
            assert table1[ds]["MambaAD"] == [*entry["mean"], entry["mAD"]]
    sizes = {ds: len(e["classes"]) for ds, e in PAPER["datasets"].items()}
    assert sizes == {"mvtec": 15, "visa": 12, "mvtec3d": 10, "medical": 3, "coco": 4, "realiad": 30}
    assert PAPER["datasets"]["mvtec"]["mean"] == [98.6, 99.6, 97.8, 97.7, 56.3, 59.2, 93.1]
    assert PAPER["tables"]["table5"]["rows"]["MambaAD"] == {"params_m": 25.7, "gflops": 8.3, "mAD": 86.0}


@pytest.mark.parametrize("table", ["table2", "table3", "table4"])
def test_ablation_rows_are_named_as_the_sweep_grids(table: str) -> None:
    entry = PAPER["tables"][table]
    grid = yaml.safe_load((REPO / entry["sweep"]).read_text())
    assert list(entry["rows"]) == [row["name"] for row in grid["rows"]]
    assert all(len(row["metrics"]) == 7 for row in entry["rows"].values())


def _run(folder: Path, name: str, results: dict[str, float], **cfg: object) -> Path:
    """A finished run folder: config.json (config ``name`` + dotted keys) and metrics.json."""
    folder.mkdir(parents=True)
    config: dict = {"name": name, "config_file": f"configs/{name}.py", "trainer": {"epochs": 500}}
    for key, value in cfg.items():
        section, leaf = key.split("__")
        config.setdefault(section, {})[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))
    per_class = {cls: {m: value for m in METRIC_NAMES} for cls, value in results.items()}
    (folder / "metrics.json").write_text(json.dumps({"final": {"epoch": 500, "results": per_class}}))
    return folder


def test_dataset_run_per_class_and_mean(tmp_path: Path) -> None:
    run = _run(tmp_path / "mambaad_mvtec_20261125-101010", "mambaad_mvtec", {"bottle": 0.9, "metal_nut": 0.8})
    [(notes, header, rows)] = collect.paper_sections(collect.find_runs([run]), PAPER)
    assert header[:4] == ["class", "I-AUROC", "I-AUROC paper", "I-AUROC diff"] and header[-1] == "mAD diff"
    by_class = {row[0]: row for row in rows}
    assert list(by_class) == ["bottle", "metal_nut", "mean"]
    assert by_class["bottle"][1:4] == pytest.approx([90.0, 100.0, -10.0])
    assert by_class["metal_nut"][13:16] == pytest.approx([80.0, 74.5, 5.5])  # P-AP, Table A2
    # two of MVTec's 15 classes: the mean is compared with the paper's mean over the same two
    bottle, metal_nut = (PAPER["datasets"]["mvtec"]["classes"][c] for c in ("bottle", "metal_nut"))
    theirs = [(a + b) / 2 for a, b in zip(bottle, metal_nut, strict=True)]
    assert by_class["mean"][1:4] == pytest.approx([85.0, theirs[0], 85.0 - theirs[0]])
    assert by_class["mean"][-3:] == pytest.approx([85.0, sum(theirs) / 7, 85.0 - sum(theirs) / 7])
    bottle_mad = sum([100.0, 100.0, 100.0, 98.8, 79.7, 76.7, 95.2]) / 7
    assert by_class["bottle"][-2] == pytest.approx(bottle_mad)
    text = "\n".join(notes)
    assert "Table 1 (Sec. 4.2)" in text and "Tables A1 (image) and A2 (pixel)" in text
    assert (
        "evaluator.mode=exact; compared: protocol exact (NOT the paper's protocol mambaad)" in text
        and "paper: evaluator.mode=mambaad" in text
    )
    assert "finished, epoch 500/500" in text
    assert "mean over the 2 class(es) both have" in text and "not in this run: cable, capsule," in text


def test_mode_matching_the_paper_is_said(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", "mambaad_visa", {"pcb1": 0.9}, evaluator__mode="mambaad")
    [(notes, _, rows)] = collect.paper_sections(collect.find_runs([run]), PAPER)
    assert "evaluator.mode=mambaad; compared: protocol mambaad (as the paper)" in notes[1]
    assert rows[0][2] == pytest.approx(95.4)  # Table A3 pcb1 I-AUROC


def test_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "r", "mambaad_mvtec3d", {"cable_gland": 0.5})
    assert collect.main([str(run), "--paper"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### r vs paper MVTec 3D-AD") and "| cable_gland | 50.0 | 94.3 | -44.3 |" in md
    assert "| mean |" in md and "| nan | nan |" not in md.split("| mean |")[0]
    assert collect.main([str(run), "--paper", "--format", "csv", "--digits", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# r vs paper") and all(line.startswith("# ") for line in lines[:3])
    table = list(csv.reader(io.StringIO("\n".join(line for line in lines if not line.startswith("#")))))
    table = [row for row in table if row]
    assert table[0][:4] == ["class", "I-AUROC", "I-AUROC paper", "I-AUROC diff"]
    assert table[1][:4] == ["cable_gland", "50.00", "94.30", "-44.30"]
    # one class of the data set: the paper's mean (and its mAD, derived) is that class's
    mean_of_seven = sum(PAPER["datasets"]["mvtec3d"]["classes"]["cable_gland"]) / 7
    assert table[2][-3] == "50.00" and float(table[2][-2]) == pytest.approx(mean_of_seven, abs=0.005)
    assert collect.main([str(run), "--paper", "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.startswith("% r vs paper") and "\\begin{tabular}" in tex and "I-AUROC diff" in tex


def test_sweep_combinations_compare_with_ablation_rows(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _run(sweep / "07_hilbert8" / "mambaad_mvtec_20261125-101010", "mambaad_mvtec", {"a": 0.98})
    _run(sweep / "r50_d3463" / "mambaad_mvtec_20261125-101010", "mambaad_mvtec", {"a": 0.9})
    [(notes, header, rows)] = collect.paper_sections(collect.find_runs([sweep]), PAPER)
    assert header[:3] == ["table", "run", "I-AUROC"]
    assert [row[:2] for row in rows] == [["table3", "07_hilbert8"], ["table2", "r50_d3463"]]
    assert rows[0][2:5] == pytest.approx([98.0, 98.6, -0.6])
    assert rows[1][-2] == pytest.approx(sum([98.4, 99.4, 97.7, 97.7, 54.2, 57.0, 92.3]) / 7)
    assert "Table 2" in notes[0] and "Table 3" in notes[0]
    assert sum(n.startswith("run ") for n in notes) == 2


def test_coco_split_and_choosing_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _run(tmp_path / "coco", "mambaad_coco", {"coco": 0.6}, data__meta_file="meta_20_2.json")
    [(notes, _, rows)] = collect.paper_sections(collect.find_runs([coco]), PAPER)
    assert [row[:3] for row in rows] == [["coco", 60.0, 66.9], ["mean", 60.0, 66.9]]  # Table A9 split 2
    assert any("split 2" in n for n in notes)

    custom = _run(tmp_path / "custom", "my_config", {"pcb1": 0.5})
    assert collect.main([str(custom), "--paper"]) == 2
    assert "pass --paper DATASET" in capsys.readouterr().err
    assert collect.main([str(custom), "--paper", "visa", "--format", "csv"]) == 0
    assert "pcb1,50.0,95.4,-45.4" in capsys.readouterr().out
    assert collect.main([str(custom), "--paper", "nope"]) == 2
    assert collect.main([str(custom), "--paper", "--cost"]) == 2


def test_coco_split_grid_covers_the_four_paper_splits() -> None:
    combos = sweep.load_grid(REPO / "configs" / "sweeps" / "table1_coco_splits.yaml")
    files = [load_config(REPO / "configs/mambaad_coco.py", c.overrides).data.meta_file for c in combos]
    assert files == [f"meta_20_{split}.json" for split in PAPER["datasets"]["coco"]["classes"]]


def test_table1_sets_each_method_beside_its_row(tmp_path: Path) -> None:
    mvtec = list(PAPER["datasets"]["mvtec"]["classes"])
    visa = list(PAPER["datasets"]["visa"]["classes"])
    runs = [
        _run(
            tmp_path / "t" / "mambaad_mvtec",
            "mambaad_mvtec",
            dict.fromkeys(mvtec, 0.9),
            model__type="mambaad",
        ),
        _run(tmp_path / "t" / "rd4ad_mvtec", "rd4ad_mvtec", dict.fromkeys(mvtec, 0.8), model__type="rd4ad"),
        _run(tmp_path / "t" / "uniad_visa", "uniad_visa", dict.fromkeys(visa[:2], 0.7), model__type="uniad"),
    ]
    sections = collect.paper_sections(collect.find_runs([tmp_path / "t"]), PAPER)
    assert [s[1][0] for s in sections] == ["class", "data set"]  # MambaAD's per-class, then Table 1
    notes, header, rows = sections[1]
    assert header[:4] == ["data set", "method", "run", "I-AUROC"]
    by_method = {row[1]: row for row in rows}
    assert set(by_method) == {"MambaAD", "RD4AD", "UniAD"} and len(runs) == 3
    rd = by_method["RD4AD"]
    paper_rd = PAPER["tables"]["table1"]["rows"]["mvtec"]["RD4AD"]
    assert rd[0] == "MVTec AD" and rd[3:6] == [
        pytest.approx(80.0),
        paper_rd[0],
        pytest.approx(80.0 - paper_rd[0]),
    ]
    assert rd[-2] == paper_rd[-1]  # the printed mAD
    uni = by_method["UniAD"]  # two of VisA's 12 classes: no paper value to set beside it
    assert uni[4] != uni[4] and any("uniad_visa: not all of VisA's classes" in n for n in notes)


def test_table5_counts_each_runs_model_beside_the_paper(tmp_path: Path) -> None:
    from util.config import save_config

    small = ["model.teacher.name=resnet18", "model.depths=[2,2,2,2]", "model.scan.directions=2"]
    cfg = load_config(REPO / "configs/mambaad_demo.py", [*small, "data.image_size=64"])
    run = _run(tmp_path / "demo_run", "mambaad_demo", {"wood": 0.5})
    save_config(cfg, run / "config.json")
    notes, header, rows = collect.table5_section(collect.find_runs([run]), PAPER)
    assert header[:5] == ["run", "method", "Params(M)", "Params(M) paper", "Params(M) diff"]
    (row,) = rows
    # resnet18 teacher, depths [2,2,2,2]: 14.6 M and 4.3 G at 256x256 (paper Table 2); at 64x64 the
    # stored scan index buffers are 16x smaller and the convolutions' FLOPs 1/16 (the counts
    # themselves are tested in test_flops.py; here: the run's model is counted, not the paper's)
    assert row[1] == "MambaAD" and 12.0 < row[2] < 14.6 and row[3] == 25.7
    assert 0.2 < row[5] < 0.3 and row[6] == 8.3
    assert row[8] != row[8] and row[9] == 86.0  # not an MVTec AD run: no mAD of its own
    assert any("DeSTSeg" in n and "reverse" in n for n in notes)  # the paper's swapped mAD, as printed


def test_compares_the_table_in_the_papers_protocol(tmp_path: Path) -> None:
    """A mambaad run records an exact table too: --paper compares its mambaad table, and says so."""
    run = _run(tmp_path / "r", "mambaad_visa", {"pcb1": 0.9}, evaluator__mode="mambaad")
    exact = {"pcb1": dict.fromkeys(METRIC_NAMES, 0.5)}
    final = {
        "epoch": 500,
        "protocol": "mambaad",
        "results": {"pcb1": dict.fromkeys(METRIC_NAMES, 0.9)},
        "exact": {"protocol": "exact", "results": exact},
    }
    (run / "metrics.json").write_text(json.dumps({"final": final}))
    assert set(collect.final_tables(run)) == {"mambaad", "exact"}
    [(notes, _, rows)] = collect.paper_sections(collect.find_runs([run]), PAPER)
    assert rows[0][1] == pytest.approx(90.0) and "compared: protocol mambaad (as the paper)" in notes[1]
    assert collect.mean_metrics(run, "exact")["I-AUROC"] == pytest.approx(50.0)
    # the reported table is exact and no mambaad table was recorded: exact is compared, and said to be
    final = {"epoch": 500, "protocol": "exact", "results": exact}
    (run / "metrics.json").write_text(json.dumps({"final": final}))
    [(notes, _, rows)] = collect.paper_sections(collect.find_runs([run]), PAPER)
    assert (
        rows[0][1] == pytest.approx(50.0) and "protocol exact (NOT the paper's protocol mambaad)" in notes[1]
    )
