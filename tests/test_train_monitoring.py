"""A short demo run, end to end, offline: what the guide promises lands in wandb's run file and the workdir."""

import json
import os
import subprocess
import sys

from test_tracker import FAKE_KEY, GUIDE_SCALARS, PROBE_PICTURES
from wandb_records import load_run, run_files

STEPS = 4


def test_demo_run_logs_the_guide_offline(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY)
    cmd = [
        sys.executable, "-m", "dinocell_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
        f"--config.train.steps={STEPS}", "--config.wandb.log_interval=2", "--config.wandb.attention_log_interval=2",
        "--config.wandb.pca_log_interval=4", "--config.wandb.histogram_interval=2", "--config.eval.interval=4",
        "--config.eval.n_fields=32", "--config.eval.val_batches=1", "--config.train.progress_bar=False",
        "--config.train.trace_from=2", "--config.train.trace_steps=1",
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (path,) = run_files(workdir)
    run = load_run(path)
    assert run.config["train"]["steps"] == STEPS and run.metrics.get("*") == "training/iteration"
    for key in GUIDE_SCALARS + ["gradients/dino_head_norm_preclip", "params/update_norm", "data/fields_read",
                                "system/data_wait_s", "system/dispatch_s", "system/device_starved_fraction"]:
        assert sorted(run.values(key)) == [2, 4], key
    for key in [f"consistency/ch{i}_vs_ch{j}" for i in range(1, 6) for j in range(i + 1, 6)]:
        assert list(run.values(key)) == [4], key
    for key in ("attention/maps", "attention/heads"):
        assert sorted(run.values(key)) == [2, 4], key
    for key in PROBE_PICTURES:
        image = run.values(key)[4]
        assert image["_type"] == "image-file" and (path.parent / "files" / image["path"]).exists(), key
    for key in ("weights/backbone", "gradients/backbone", "gradients/dino_head"):
        assert run.values(key)[2]["_type"] == "histogram", key
    for key in ("eval/knn_top1", "eval/linear_acc", "val/loss/dino", "val/loss/total"):
        assert list(run.values(key)) == [4], key

    # The workdir holds the same scalars, the pictures as PNG and the resolved config.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["training/iteration"] for r in rows] == [2, 4]
    assert rows[-1]["loss/total"] == run.values("loss/total")[4]
    assert any(p.name.startswith("attention_maps") for p in (workdir / "figures").iterdir())
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    # the profiler trace asked for (step 2): the device's side and Perfetto's file
    assert list((workdir / "trace").rglob("*.xplane.pb")) and list((workdir / "trace").rglob("*.trace.json.gz"))
    for file in workdir.rglob("*"):
        if file.is_file():
            assert FAKE_KEY.encode() not in file.read_bytes(), file
