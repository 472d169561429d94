"""The demo command, shortened, on the simulated devices: its DINO and iBOT losses fall.

`python -m dinocell_jax.train --config configs/demo.py` with 200 of its 400 steps
(pictures, evaluation and checkpoints off to keep the budget for training). On 8
simulated CPU devices loss/dino goes from ~7.35 (first 25 steps) to ~6.88, below
ln K = 6.93, and loss/ibot from ~3.69 to ~3.36 (2026-11-27). Before the demo
standardised each crop and started with unit-norm frozen prototypes, both sat at
ln K from the first steps (docs/BENCHMARKS.md).
"""

import json
import math
import os
import subprocess
import sys

from tiny import training_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG = 200, 25


def test_demo_dino_loss_falls(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "dinocell_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
        f"--config.train.steps={STEPS}", f"--config.wandb.log_interval={LOG}", "--config.wandb.enabled=False",
        "--config.wandb.log_attention_maps=False", "--config.wandb.log_feature_pca=False",
        "--config.wandb.histogram_interval=0", "--config.eval.interval=0", "--config.train.progress_bar=False",
        f"--config.checkpoint.interval={10 * STEPS}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/dino" in r]
    assert [r["training/iteration"] for r in rows] == list(range(LOG, STEPS + 1, LOG))
    ln_k = math.log(1024)  # configs/demo.py heads.out_dim
    dino = [r["loss/dino"] for r in rows]
    ibot = [r["loss/ibot"] for r in rows]
    # Windows of 25 steps: the last is well below the first, and below ln K (the
    # value of a student that gave up and predicts uniformly).
    assert dino[-1] < dino[0] - 0.25 and dino[-1] < ln_k, dino
    assert ibot[-1] < ibot[0] - 0.15, ibot
