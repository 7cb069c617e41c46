"""Write ``meta.json`` for a data set in one of the published layouts, and check every file it lists.

    python tools/prepare_data.py --dataset mvtec --root data/mvtec
    python tools/prepare_data.py --dataset folder --root my_data --out /tmp/meta.json
    python tools/prepare_data.py --dataset realiad --root data/realiad --views C1,C2
    python tools/prepare_data.py --dataset mvtec --root data/mvtec --check
    python tools/prepare_data.py --dataset coco --root data/coco --split 0
    python tools/prepare_data.py --dataset loco --root data/mvtec_loco
    python tools/prepare_data.py --dataset dtd --root data/dtd

``--dataset coco`` writes one meta per COCO-AD split, ``meta_20_<split>.json`` (all four by default),
and the split's test masks ``val2017_mask_ad_20_<split>/`` into the root; ``--out`` is then a folder.

``--dataset loco`` also writes each anomalous image's merged binary mask into
``<cls>/ground_truth_merged/``; ``--dataset mvtec2`` keeps ``validation`` as its own split and
leaves out the private test sets (no ground truth).

``--dataset dtd`` prepares the Describable Textures Dataset (the texture source of methods trained on
synthesized anomalies, ``data.anomaly_source.root``): it lists ``ROOT/images/<category>/*.jpg`` in
``ROOT/textures.json`` and opens every file.

``--check`` only validates an existing meta.json (for dtd: textures.json). Problems are all listed,
each with the file and the fix, and the exit status is non-zero when there are any. Paths must be
relative to ``--root`` and stay inside it; an entry with ``..`` climbing out of it, or an absolute path
(unless ``--allow-absolute-paths``), is a problem and its file is not read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.anomaly_source import DTD_URL, prepare_dtd
from data.coco import NUM_SPLITS, meta_name
from data.meta import PATH_KEYS, DataError, path_problem, read_json, write_meta
from data.prepare import LAYOUTS, PARSERS, count_table, structure_problems, validate_meta
from util.errors import UserError, write_failure


def _targets(args: argparse.Namespace) -> list[tuple[Path, dict]]:
    """(meta path, parser keyword arguments) for each meta file the command produces or checks."""
    if args.dataset != "coco":
        views = [v for v in args.views.split(",") if v] if args.views else None
        options = {"json_dir": args.json_dir, "views": views, "progress": not args.no_progress}
        return [(args.out or args.root / "meta.json", options)]
    folder = args.out or args.root
    return [(folder / meta_name(s), {"split": s}) for s in sorted(set(args.split or range(NUM_SPLITS)))]


def _split_unsafe(meta: dict, allow_absolute: bool) -> tuple[dict, list[str]]:
    """``meta`` without the items whose paths leave the root, and one problem per refused path.

    Every split is looked at (``train``, ``test`` and any other, e.g. ``validation``).
    """
    kept = dict(meta)
    problems = []
    for split, classes in meta.items():
        if not isinstance(classes, dict):
            continue
        kept[split] = {}
        for cls_name, items in classes.items():
            kept[split][cls_name] = items
            if not isinstance(items, list):
                continue
            kept[split][cls_name] = []
            for i, item in enumerate(items):
                keys = [k for k in PATH_KEYS if isinstance(item, dict) and k in item]
                found = [path_problem(item[k], k, allow_absolute) for k in keys]
                found = [f"[{split!r}][{cls_name!r}][{i}]: {f}" for f in found if f]
                problems.extend(found)
                if not found:
                    kept[split][cls_name].append(item)
    return kept, problems


def _run_one(args: argparse.Namespace, out: Path, kwargs: dict) -> int:
    """Write (or, with --check, read) one meta file, print its counts and validate it."""
    try:
        if args.check:
            if not out.is_file():
                raise DataError(
                    f"{out} not found; run without --check to create it (--dataset {args.dataset} "
                    f"expects {LAYOUTS[args.dataset]} under --root)"
                )
            meta = read_json(out, "run without --check to rebuild it")
        else:
            meta, notes = PARSERS[args.dataset](args.root, **kwargs)
            for note in notes:
                print(f"note: {note}")
            write_meta(out.parent, meta, out.name)
            print(f"wrote {out}")
    except (UserError, OSError) as err:  # bad data, or a meta file (or coco mask) that cannot be written
        intact = f"{out} was not changed"
        failure = err if isinstance(err, UserError) else write_failure(err, out, "--out", intact)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return failure.exit_code
    problems = structure_problems(meta)
    if not problems:
        print(count_table(meta))
        meta, problems = _split_unsafe(meta, args.allow_absolute_paths)  # never read outside the root
        problems += validate_meta(args.root, meta, progress=not args.no_progress)
    return _report_problems(problems, f" in {out}")


def _report_problems(problems: list[str], suffix: str) -> int:
    """Print each problem and their count (``suffix`` ends "N problem(s) found"); the exit status."""
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found{suffix}", file=sys.stderr)
        return 1
    print("all files present and readable")
    return 0


def _run_dtd(args: argparse.Namespace) -> int:
    """Write (or, with --check, read) DTD's textures.json and open every texture it lists."""
    try:
        path, count, problems = prepare_dtd(args.root, check=args.check, progress=not args.no_progress)
    except (UserError, OSError) as err:
        failure = (
            err if isinstance(err, UserError) else write_failure(err, args.root / "textures.json", "--root")
        )
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return failure.exit_code
    if not args.check:
        print(f"wrote {path}")
    print(f"{count} textures listed in {path}")
    return _report_problems(problems, f"; re-download DTD from {DTD_URL}")


def main(argv: list[str] | None = None) -> int:
    """Parse, write, validate and print the count table; return the process exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=sorted([*PARSERS, "dtd"]))
    ap.add_argument("--root", required=True, type=Path, help="data set root folder")
    ap.add_argument(
        "--out", type=Path, help="meta.json path (default: ROOT/meta.json; coco: folder, default ROOT)"
    )
    ap.add_argument("--check", action="store_true", help="only validate the existing meta file(s)")
    ap.add_argument("--json-dir", type=Path, help="realiad: per-class JSON folder (ROOT/realiad_jsons)")
    ap.add_argument("--views", help="realiad: comma-separated camera views to keep, e.g. C1,C2")
    ap.add_argument(
        "--split", type=int, action="append", choices=range(NUM_SPLITS), help="coco: split(s) (default: all)"
    )
    ap.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="accept absolute image/mask paths (data kept outside the root; data.allow_absolute_paths)",
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    if args.dataset == "dtd":
        return _run_dtd(args)
    status = 0
    for out, kwargs in _targets(args):
        status = max(status, _run_one(args, out, kwargs))
    return status


if __name__ == "__main__":
    sys.exit(main())
