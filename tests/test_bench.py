"""The benchmark suite runs end to end at a tiny size (a guard against rot, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_suite_runs_and_reports_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--device", "cpu", "--images", "20",
         "--epochs", "1", "--batch-size", "8", "--stage2-size", "2000,16,4", "--work",
         str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    r = result["results"]
    assert set(r) == {"a_decode_ceiling", "b_model_ceiling", "c_stage1", "d_dataloader_pil",
                      "e_fix", "f_stage2"}
    assert result["images_train"] == 10  # 2 rounds of the 10 classes: one val, one train
    assert r["e_fix"]["old_remedy_s"] > 0 and r["e_fix"]["ours_s"] > 0
    assert r["f_stage2"]["n"] == 2000
    assert "| e. speedup |" in proc.stdout
