"""The benchmark scripts' shared bookkeeping: resumable CSVs, the command log and the calibration-set cache."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from calib_cache import calib_run_dir  # noqa: E402
from resumable_csv import append_row, log_command, open_results  # noqa: E402


def test_open_results_resumes_from_existing_rows(tmp_path):
    path = tmp_path / "grid.csv"
    key = lambda r: (r["model"], r["seed"])  # noqa: E731
    assert open_results(path, ["model", "seed", "top1"], key) == set()
    assert path.read_text().splitlines() == ["model,seed,top1"]
    for seed, top1 in ((0, 91.5), (1, 91.0)):
        append_row(path, ["model", "seed", "top1"], {"model": "r20", "seed": seed, "top1": top1})
    assert path.read_text().splitlines()[1:] == ["r20,0,91.5", "r20,1,91.0"]
    assert open_results(path, ["model", "seed", "top1"], key) == {("r20", "0"), ("r20", "1")}


def test_log_command_appends_invocations_and_lists_them(tmp_path, monkeypatch):
    out = tmp_path / "qat"
    monkeypatch.setattr(sys, "argv", ["benchmarks/qat.py", "--models", "fmnist/resnet20", "--note", "a b"])
    assert log_command(out, record=False) == ""  # --report-only: nothing logged, nothing to list
    first = log_command(out)
    monkeypatch.setattr(sys, "argv", ["benchmarks/qat.py", "--report-only"])
    assert log_command(out, record=False) == first
    assert first == "- `python benchmarks/qat.py --models fmnist/resnet20 --note 'a b'`\n"
    log_command(out)
    assert len((tmp_path / "qat.commands.txt").read_text().splitlines()) == 2


def test_generated_sets_are_shared_by_label_set_and_inversion_sets_are_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_BENCH_CACHE", str(tmp_path))
    a = SimpleNamespace(name="fmnist/resnet20", class_names=["T-shirt", "Trouser"])
    b = SimpleNamespace(name="fmnist/mobilenetv2", class_names=["T-shirt", "Trouser"])
    c = SimpleNamespace(name="other/resnet20", class_names=["cat", "dog"])
    assert calib_run_dir(a, "mixup", 0) == calib_run_dir(b, "mixup", 0) != calib_run_dir(c, "mixup", 0)
    assert calib_run_dir(a, "mixup", 0) != calib_run_dir(a, "mixup", 1)
    assert calib_run_dir(a, "distill", 0) != calib_run_dir(b, "distill", 0)
    assert Path(calib_run_dir(a, "distill", 0)).parent.parent == tmp_path


def test_notes_beside_a_table_reach_its_report(tmp_path):
    from resumable_csv import notes_for

    out = tmp_path / "grid"
    assert notes_for(out) == ""
    (tmp_path / "grid.notes.md").write_text("The ResNet-20 rows are older.\n\n")
    assert notes_for(out) == "Notes (grid.notes.md):\n\nThe ResNet-20 rows are older.\n\n"
