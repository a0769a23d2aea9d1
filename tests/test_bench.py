"""The benchmark suite runs end to end at a tiny size (a guard against rot, not a timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_suite_runs_and_reports_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--device", "cpu", "--images", "30",
         "--model-images", "10", "--models", "pool,resnet18", "--reps", "1", "--epochs", "1",
         "--batch-size", "8", "--threads", "2", "--stage2-size", "2000,16,4", "--work",
         str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    r = result["results"]
    assert set(r) == {"a_reference", "c_stage1_pool", "c_stage1_resnet18", "b_model_ceiling",
                      "c_stage1_fix", "d_dataloader_pil", "e_fix", "f_stage2"}
    assert result["images_train"] == 20  # 3 rounds of the 10 classes: one val, two train
    assert result["model_images"] == 10
    # the reference was tuned, and each stage 1 run was set against it on the same files
    assert len(r["a_reference"]["tuning"]) == 2 * len({2, 3})
    assert r["c_stage1_pool"]["images"] == 20 and r["c_stage1_resnet18"]["images"] == 10
    for m in ("pool", "resnet18"):
        c = r[f"c_stage1_{m}"]
        assert c["ratio"] == c["stage1_img_s"] / c["reference_img_s"] > 0
        assert c["profile_last_run"]["wait_for_batches_s"] >= 0
    assert "stage1_pool_over_reference" in result["ratios"]
    assert r["e_fix"]["old_remedy_s"] > 0 and r["e_fix"]["ours_s"] > 0
    assert r["f_stage2"]["n"] == 2000
    assert "| e. speedup |" in proc.stdout
    assert "c. stage 1, pool (20 images): stage 1 / reference" in proc.stdout
