"""A reduced-budget scripts/ssl_quality.py: the real trainer learns features a random network lacks."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "ssl_quality.py")


def _script():
    spec = importlib.util.spec_from_file_location("ssl_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_are_checked_before_any_work():
    script = _script()
    with pytest.raises(SystemExit, match="--steps: 'many' is not an integer"):
        script.main(["--steps", "many"])
    with pytest.raises(SystemExit, match="--bogus: unknown argument"):
        script.main(["--bogus"])
    assert script._split_args(["--steps=7", "--config.optim.lr=0.01", "--require"]) == (
        7, None, True, ["--config.optim.lr=0.01"])


def test_dino_collapse_is_read_from_the_run(tmp_path):
    script = _script()
    rows = [{"training/iteration": 50, "loss/dino": 7.0},
            {"training/iteration": 100, "loss/dino": 0.9 * math.log(1024), "gradients/dino_head_norm": 0.5},
            {"training/iteration": 100, "eval/knn_top1": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script._dino_health(str(tmp_path), 1024) == {"dino_loss_over_ln_k": 0.9, "dino_head_grad_norm": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(SystemExit, match="has no loss/dino"):
        script._dino_health(str(tmp_path), 1024)


# Known defect (issue 7 stays open): the demo's DINO objective collapses to a uniform
# head output (loss/dino ~ ln K within ~100 steps: two views of a synthetic field share
# too little at init for the teacher's targets to be predictable), after which iBOT
# learns patch content and KoLeo spreads the CLS; the features do not beat random init
# at telling the phenotypes apart (1200 steps: k-NN 0.277 vs 0.289; docs/BENCHMARKS.md).
# Strict: once the demo learns features this XPASSes and fails, and the mark must go.
@pytest.mark.xfail(reason="demo features do not beat random init yet (see comment)", strict=True)
@pytest.mark.slow
def test_short_run_improves_knn_over_random_init(tmp_path):
    # A subprocess, as a user runs it: the trainer's wandb, tqdm and logging own
    # the process's stdio, which in-process would outlive pytest's capture.
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "120", "--workdir", str(workdir),
         "--config.eval.n_fields=64", "--config.eval.batch_size=32", "--config.wandb.log_interval=50"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("knn_random", "knn_trained", "consistency_random", "consistency_trained",
                "retrieval_random", "retrieval_trained", "steps", "seconds", "dino_loss_over_ln_k"):
        assert key in report, key
    assert report["steps"] == 120 and report["eval_fields"] == 64
    assert (workdir / "checkpoints" / str(report["steps"])).is_dir()  # the trained teacher was evaluated
    assert report["knn_trained"] > report["knn_random"] + 0.05, report
    # held-out retrieval across stains: the trained network finds the same field more often
    assert report["retrieval_trained"] > report["retrieval_random"], report
