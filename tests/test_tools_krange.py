"""tools.krange at toy size: one run per K, PSNR at 1/10/t* steps, reports, and a rerun that trains nothing."""

from __future__ import annotations

import json

from click.testing import CliRunner
from helpers import CPU_PRECISION

from tools.common import read_json
from tools.krange import main
from tools.prepare import prepare


def test_krange_toy_run_reports_and_resumes(tmp_path):
    clean = tmp_path / "clean"
    prepare(None, clean, limit_per_class=4, beton=False)
    work, out = tmp_path / "work", tmp_path / "report"
    args = ["--sparse", str(clean / "sparse"), "--k", "full", "--k", "20", "--iterations", "2", "--per-class", "1",
            "--t-star", "10", "--work", str(work), "--out", str(out), "--precision", CPU_PRECISION]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "training k20 (from scratch)" in res.output, res.output
    results = read_json(work / "results.json")
    assert set(results["runs"]) == {"kfull", "k20"}
    assert results["runs"]["k20"]["max_timestep"] == 20 and results["runs"]["kfull"]["max_timestep"] == 4000
    for run in results["runs"].values():
        assert set(run["psnr"]) == {"1", "10"} and run["train_seconds"] > 0 and len(run["segments"]) == 1
    md = (tmp_path / "report.md").read_text()
    assert "| [0, 20) |" in md and "| [0, 4000) |" in md
    assert json.loads((tmp_path / "report.json").read_text())["iterations"] == 2
    assert (tmp_path / "report.png").stat().st_size > 1000

    again = CliRunner().invoke(main, args)  # finished runs are neither trained nor measured again
    assert again.exit_code == 0 and "training k" not in again.output
    assert read_json(work / "results.json")["runs"]["k20"]["segments"] == results["runs"]["k20"]["segments"]
    other = CliRunner().invoke(main, [a if a != "2" else "3" for a in args])  # --iterations 3
    assert other.exit_code != 0 and "use another --work" in other.output
