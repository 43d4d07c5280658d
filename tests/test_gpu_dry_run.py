"""benchmarks/gpu.py --dry-run: builds models and plans without a GPU, lists the cells, writes nothing."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_dry_run_lists_cells(tmp_path):
    out = tmp_path / "gpu.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--models", "deit_tiny_patch16_224",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    # every plan is built; the aligned one obeys the kernel rules
    for variant in ("dense", "global", "aligned"):
        assert re.search(rf"deit_tiny_patch16_224\s+{variant}\s", text), text
    assert "aligned plans obey kernel rules: yes" in text
    # the cells: 3 dtypes x 3 batches of eager and compile, SDPA per dtype, ORT CUDA fp32/fp16, 2:4,
    # latency tables for two runtimes at two batches, TensorRT fp16/fp32
    assert "cells per section: eager=9, sdpa=3, ort-cuda=2, compile=9, sparse24=1, lut=4, ort-trt=2" in text, text
    assert "would measure 30 cells" in text
    for batch in (1, 64, 256):
        assert re.search(rf"eager\s+deit_tiny_patch16_224\s+fp16\s+batch={batch}\s", text)
        assert re.search(rf"compile\s+deit_tiny_patch16_224\s+fp32\s+batch={batch}\s", text)
    assert "LatencyTable('ort-cuda')" in text and "LatencyTable('torch-cuda')" in text
    assert not out.exists()  # nothing was measured, so no results file
