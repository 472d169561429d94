"""scripts/benchmark.py keeps working: at toy size on CPU it prints its JSON line."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_at_toy_size():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--config", "configs/demo.py",
         "--steps", "2", "--window", "1", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "step_s", "mfu", "peak_mem_gib", "compile_s", "device", "n_devices", "batch", "jax"):
        assert key in result, key
    assert result["n_devices"] == 8 and result["batch"] == 32
    assert result["images_per_s"] > 0 and result["step_s"] > 0 and result["gflop_per_image"] > 0
    # the XLA flags the step was compiled with: the trainer's defaults (train.triton_gemm) included
    assert "--xla_gpu_enable_triton_gemm=false" in result["xla_flags"]


def test_benchmark_train_runs_the_real_trainer_at_toy_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark_train.py"), "--config", "configs/demo.py",
         "--steps", "20", "--log_interval", "10", "--modes", "off", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["batch"] == 32 and result["off_windows"] == 1
    assert result["off_images_per_s"] > 0 and 0.0 <= result["off_input_wait_share"] < 1.0
    assert 0.0 <= result["off_device_starved_share"] <= 1.0
    # the input wait split: collating 32 fields takes some time, handing them over too
    assert result["off_collate_s_per_batch"] > 0 and 0.0 < result["off_host_to_device_share"] < 1.0
    assert 0.0 < result["off_dispatch_s"] <= result["off_step_s"]  # a part of each loop iteration
    # the trainer's whole stderr is kept though it succeeded (where XLA's own log is read)
    assert "mesh {" in (tmp_path / "off" / "stderr.log").read_text()


def test_benchmark_train_refuses_a_workdir_holding_an_earlier_run(tmp_path):
    # The trainer would resume that run, and its metrics would be reported as this one's.
    (tmp_path / "off").mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark_train.py"), "--config", "configs/demo.py",
         "--steps", "20", "--modes", "off", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert f"{tmp_path / 'off'} exists" in proc.stderr


def test_head_geometry_reports_the_heads_spread():
    import importlib.util
    import math

    spec = importlib.util.spec_from_file_location("head_geometry", os.path.join(REPO, "scripts", "head_geometry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--config", os.path.join(REPO, "configs", "demo.py"), "--steps", "2", "--every", "1",
                        "--config.train.batch_size=8"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("cls_spread", "z_spread", "logit_spread_fields", "logit_spread_prototypes",
                    "cross_entropy", "target_entropy"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        # Gibbs: a cross-entropy is never below the targets' own entropy, which is at most ln K.
        assert row["target_entropy"] <= row["ln_k"] + 1e-3
        assert row["cross_entropy"] >= row["target_entropy"] - 1e-3
    assert "loss/dino" in rows[1] and math.isfinite(rows[1]["loss/dino"])
