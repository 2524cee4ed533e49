"""The Table 1 reproduction script runs end to end in its quick mode."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "reproduce_table.py"


@pytest.mark.slow
def test_quick_run_writes_the_report_and_figure(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = (tmp_path / "results.md").read_text()
    assert "| Decoy Digits (binary) | baseline |" in report
    assert "GradMask contrast sq_l2" in report
    assert (tmp_path / "results.png").stat().st_size > 0
