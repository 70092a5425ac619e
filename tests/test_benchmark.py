"""scripts/benchmark.py runs end to end (a smoke run on the CPU with a tiny model); its numbers are not checked."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_benchmark_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--images", "32", "--cache-epochs", "3",
           "--host-steps", "20", "--recipe-steps", "4", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    expected = {
        "a_eager": ["raw_img_s", "tool_img_s", "ratio", "tool_no_progress_bar_img_s"],
        "c_feature_cache": ["recompute_s", "cached_cold_s", "cached_warm_s", "ratio"],
        "d_data": ["cpu_decode_img_s", "device_decode_img_s", "e2e_cpu_decode_img_s", "synthetic_img_s", "ratio"],
        # the real recipe (elpv_best on its own images, shrunk for the CPU) and the host work per step
        "e_recipe": ["first_step_latency_s", "first_epoch_s", "tool_img_s", "raw_img_s", "ratio"],
        "h_host": ["tool_cpu_ms_per_step", "raw_cpu_ms_per_step", "ratio"],
    }
    for section, keys in expected.items():
        for key in keys:
            value = results[section][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (section, key, value)
        assert "target" in results[section]
    assert "b_compile" in results["skipped"]  # compiling takes minutes on a CPU: left out of the smoke run
    assert results["settings"]["model"] == "test_resnet"
    assert results["e_recipe"]["experiment"] == "elpv_best" and results["e_recipe"]["steps"] == 4
    assert "a_eager" in proc.stdout and "ratio" in proc.stdout  # the printed table
    assert "targets" in proc.stdout and ">= 0.98" in proc.stdout  # each headline beside its target
