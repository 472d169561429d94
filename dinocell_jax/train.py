"""DINO + iBOT + KoLeo pretraining of a ViT on Cell Painting fields.

    python -m dinocell_jax.train --config configs/demo.py --workdir runs/demo
    python -m dinocell_jax.train --config configs/vits8_jump_multiview.py \
        --config.data.source=loaddata:/data/jump/load_data.csv --config.wandb.project=my-proj

Running the same command again resumes from the workdir's last checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np

from dinocell_jax import checkpoint as ckpt_lib
from dinocell_jax import cli, evaluate, parallel, sweep
from dinocell_jax import config as config_lib
from dinocell_jax.data import pipeline
from dinocell_jax.data.device_feed import DeviceFeed
from dinocell_jax.data.sources import channel_list
from dinocell_jax.monitor import logger as logger_lib
from dinocell_jax.monitor.system import DeviceStarvation, LoopTimer, StepTrace, system_metrics
from dinocell_jax.ssl import optim
from dinocell_jax.ssl import step as step_lib
from dinocell_jax.ssl.schedules import Schedules

log = logging.getLogger("dinocell_jax")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


class _StopRequest:
    """SIGTERM/SIGINT: finish the step in flight, save, flush, exit 0."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            # A second signal means "now": unwind (the finally blocks still wait for
            # a save in flight, so the last finished checkpoint stays usable).
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signal = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        # Every process must stop at the same step: agree on the flag, every few
        # steps since it is a collective.
        if step % 10:
            return False
        from jax.experimental import multihost_utils

        flag = np.array([self.signal is not None], np.int32)
        return bool(np.any(multihost_utils.process_allgather(flag)))


class _Reporter:
    """Host side of each step, run `train.steps_in_flight` steps late so fetching never stalls
    the device.

    Counts non-finite steps (stopping after `train.max_bad_steps` in a row),
    averages the scalars over `wandb.log_interval`, checks gradient health and
    moves the progress bar.
    """

    def __init__(self, config, logger, feed: DeviceFeed, progress, meters: list[LoopTimer | DeviceStarvation]):
        self.config, self.logger, self.feed, self.progress = config, logger, feed, progress
        self.meters = meters  # the loop's interval measures: system/<...>, popped at each log step
        self.accumulator = logger_lib.MetricAccumulator()
        self.health = logger_lib.GradientHealth(config.wandb.grad_norm_high, config.wandb.grad_norm_low)
        self.total_steps = config_lib.total_steps(config)
        self.steps_per_epoch = config_lib.steps_per_epoch(config)
        self.bad_steps = 0

    def report(self, step: int, metrics: dict, step_time: float) -> None:
        config = self.config
        metrics = jax.device_get(metrics)
        histograms = metrics.pop("histograms", None)  # gradient histograms, filled at the interval
        if histograms and (step + 1) % config.wandb.histogram_interval == 0:
            for name, hist in histograms.items():
                self.logger.log_histogram(name, hist, step + 1)
        if int(metrics["training/nonfinite"]):
            self.bad_steps += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            if self.bad_steps >= config.train.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient "
                    f"(last: step {step}); lower optim.lr or check the data (limit: train.max_bad_steps)"
                )
        else:
            self.bad_steps = 0
        self.accumulator.add(metrics)
        self.accumulator.add({"training/step_time": step_time})
        msg = self.health.check(float(metrics["gradients/global_norm"]), step)
        if msg:
            self.logger.alert("gradient health", msg)  # also printed on the console
        done = step + 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{float(metrics['loss/total']):.3f}",
                                      img_s=f"{config.train.batch_size / max(step_time, 1e-9):.0f}")
        if done % config.wandb.log_interval == 0 or done == self.total_steps:
            scalars = self.accumulator.means()
            self.accumulator.reset()
            scalars["training/images_per_sec"] = config.train.batch_size / max(scalars["training/step_time"], 1e-9)
            scalars["training/iteration"] = done
            scalars["training/epoch"] = done / self.steps_per_epoch
            scalars |= {f"data/{k}": v for k, v in self.feed.stats().items()}  # since the start
            for meter in self.meters:  # this interval: system/data_wait_s, system/device_starved_fraction, ...
                scalars |= meter.pop()
            scalars |= system_metrics(jax.local_devices())
            self.logger.log_metrics(scalars, done)


def _validation_batches(config, source, mesh, mask_group: int) -> list[dict]:
    """`eval.val_batches` fixed batches of held-out fields, with fixed iBOT masks: this process's
    rows, in host memory. Sent to the devices at each evaluation only: kept there, four batches of
    128 1080 px fields would hold 5.6 GiB of a GPU for the whole run."""
    batch, rows = config.train.batch_size, parallel.process_rows(mesh, config.train.batch_size)
    n = min(len(source) // batch, config.eval.val_batches)
    out = []
    for i in range(n):
        records = [source[i * batch + j] for j in range(rows.start, rows.stop)]
        local = {k: np.stack([r[k] for r in records]) for k in ("field", "norm_low", "norm_high")}
        # A mask stream of its own (step ids past any training step).
        local["masks"] = step_lib.host_masks(config, 2**31 + i, mask_group)[rows]
        out.append(local)
    return out


def _evaluate(state, evaluator, eval_loss, val_batches, mesh) -> dict:
    """Probes of the teacher's features (k-NN, linear, consistency) and the held-out loss."""
    metrics = evaluator(state.teacher)
    if val_batches:
        losses = jax.device_get([eval_loss(state, parallel.to_global_batch(b, mesh)) for b in val_batches])
        metrics |= {f"val/{k}": float(np.mean([l[k] for l in losses])) for k in losses[0]}
    return metrics


def _probe_batch(config, source, mesh) -> tuple[dict, dict]:
    """The fixed fields the pictures are drawn from, replicated, and their metadata."""
    n = min(config.wandb.probe_size, len(source))
    records = [source[i] for i in range(n)]
    arrays = {k: np.stack([r[k] for r in records]) for k in ("field", "norm_low", "norm_high")}
    meta = {k: [str(r.get(k, "")) for r in records] for k in ("plate", "well", "site", "batch", "label")}
    return jax.device_put(arrays, parallel.replicated(mesh)), meta


def main(argv: list[str] | None = None) -> int:
    log.setLevel(logging.INFO)
    config, workdir = cli.parse_config(sys.argv[1:] if argv is None else argv)
    workdir = sweep.apply_agent(config, workdir)  # a `wandb agent` run: its values and run id
    # Installed first: a preemption notice during start-up or compilation still
    # ends in a clean save after the first step.
    stop = _StopRequest()
    parallel.configure_gpu_backend(config)
    parallel.initialize(config)
    config_lib.validate(config, jax.device_count())
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_lib.to_dict(config), f, indent=2, sort_keys=True)
    total_steps = config_lib.total_steps(config)

    # ---- Mesh
    mesh = parallel.make_mesh(config)
    n_devices = jax.device_count()
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), n_devices, jax.process_count())

    # ---- Input
    train_iter = pipeline.make_iterator(config, "train", seed=config.seed, stack_fields=False)
    holdout = pipeline.make_source(config, "holdout")
    probe, probe_meta = _probe_batch(config, holdout, mesh)
    channel_names = [c.name for c in channel_list(config.data)]  # the planes' order in a field
    local_rows = parallel.process_rows(mesh, config.train.batch_size)  # this process's rows of the masks
    mask_group = step_lib.device_group_size(config, n_devices)  # iBOT masks are drawn per device group

    # ---- Model, schedules, optimiser
    models = step_lib.make_models(config)
    schedules = Schedules.from_config(config)
    optimizer = optim.make_optimizer(config, schedules)

    # ---- Shard & init: the state is born sharded (eval_shape, then a jitted init).
    abstract, init = step_lib.sharded_init(config, optimizer, mesh)
    shardings = step_lib.shardings_of(abstract)

    # ---- Checkpoint: resume from the workdir, or from checkpoint.resume_from
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR), config)
    if is_main:
        checkpointer.remove_unfinished()
    source_ckpt, source_step = checkpointer, None
    if checkpointer.latest_step() is None and config.checkpoint.resume_from:
        resume_dir, source_step = ckpt_lib.resolve_checkpoint_path(config.checkpoint.resume_from)
        source_ckpt = ckpt_lib.Checkpointer(resume_dir, config, read_only=True)
    if source_ckpt.latest_step() is not None:
        state, data_state, meta = source_ckpt.restore(abstract, source_step)
        train_iter.set_state(data_state)
        changes = ckpt_lib.config_changes(meta.get("config", {}), config)
        if changes:
            log.warning("config differs from the checkpoint's in %d keys:\n  %s", len(changes),
                        "\n  ".join(changes[:30]))
        log.info("resumed from %s at step %d", source_ckpt.directory, int(state.step))
        if source_ckpt is not checkpointer:
            source_ckpt.close()
    else:
        state = init(jax.random.key(config.seed))
        if config.model.init_from:
            state = ckpt_lib.load_pretrained(state, config, config.model.init_from)
    start_step = int(state.step)
    stop_after = config.train.stop_after
    end_step = total_steps if stop_after < 0 else min(stop_after, total_steps)  # this run's last step

    # ---- Steps
    batch_shard = parallel.batch_sharding(mesh)
    batch_shardings = {k: batch_shard for k in ("field", "norm_low", "norm_high", "masks")}
    train_step = jax.jit(
        step_lib.make_train_step(config, models, optimizer, schedules, n_devices),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    metrics_fn = jax.jit(step_lib.make_metrics_fn(config, models))
    histograms_fn = jax.jit(step_lib.param_histograms)
    eval_cfg = config.eval
    if eval_cfg.interval > 0:
        evaluator = evaluate.make_evaluator(config, models)
        val_batches = _validation_batches(config, holdout, mesh, mask_group)
        eval_loss = jax.jit(step_lib.make_eval_loss(config, models, n_devices),
                            in_shardings=(shardings, batch_shardings))

    # ---- Monitoring
    logger = logger_lib.create_logger(
        config, workdir, process_index=jax.process_index(), resume_step=start_step
    )
    wandb_cfg = config.wandb
    if wandb_cfg.log_model_checkpoints and wandb_cfg.enabled and logger.enabled:
        # Each save is uploaded once Orbax has finalised it, from a hard-linked snapshot.
        checkpointer.publish_artifacts(
            logger, final_step=total_steps, staging_dir=os.path.join(workdir, ckpt_lib.UPLOAD_SUBDIR),
            artifacts_log=os.path.join(workdir, "artifacts.jsonl"),
        )
    progress = None
    if is_main and config.train.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True)

    def device_batch(host: dict, step: int) -> dict:
        local = {k: host[k] for k in ("field", "norm_low", "norm_high")}
        local["masks"] = step_lib.host_masks(config, step, mask_group)[local_rows]
        return parallel.to_global_batch(local, mesh)

    # The loop waits for batches already on the devices (data_wait); a thread reads and
    # transfers them ahead of it (host_to_device). Started now, it also fills during compilation.
    data_wait, host_to_device = LoopTimer("data_wait"), LoopTimer("host_to_device")
    # The host's time inside the step's call: argument checks, and the runtime's launch (with
    # XLA's command buffers, re-recording the CUDA graph whenever a buffer's address changed).
    # Near training/step_time, it holds the devices (starvation without data_wait).
    dispatch = LoopTimer("dispatch")
    starvation = DeviceStarvation()  # whether the step before had already finished at each dispatch
    trace = StepTrace(os.path.join(workdir, "trace"), config.train.trace_from, config.train.trace_steps,
                      python=config.train.trace_python)
    feed = DeviceFeed(train_iter, device_batch, start_step, config.data.device_prefetch, host_to_device)
    reporter = _Reporter(config, logger, feed, progress, [data_wait, host_to_device, dispatch, starvation])
    # ---- Loop
    in_flight: collections.deque = collections.deque()  # (step, metrics, step_time) dispatched, not yet read

    def read_in_flight(keep: int):
        """Reports the oldest steps in flight until `keep` are left (each read waits for its step)."""
        while len(in_flight) > keep:
            reporter.report(*in_flight.popleft())

    def save(step_done: int, force: bool = False):
        # Every step up to the checkpoint logged first, and written (the metrics file holds a
        # step's row until the next step's arrives): a run killed after this save resumes past
        # those steps and would never log them. The wait (the last step, then the writer's queue:
        # those steps' rows, at times a figure or an artifact hand-over, seconds at most) comes
        # once per checkpoint, 10000 steps in the guide's config.
        read_in_flight(keep=0)
        logger.flush()
        meta = ckpt_lib.run_metadata(config, logger.wandb_run_id)
        checkpointer.save(step_done, state, feed.get_state(), meta, force=force)

    last = time.perf_counter()
    try:
        with jax.set_mesh(mesh):  # drop path draws its subset per device, as DINOv2 per GPU
            for step in range(start_step, end_step):
                with data_wait.timing():
                    batch = next(feed)
                if in_flight:  # had the step before already finished?
                    starvation.observe(in_flight[-1][1]["loss/total"].is_ready())
                trace.before_step(step)
                with dispatch.timing():
                    state, metrics = train_step(state, batch)
                trace.after_step(step, metrics)
                read_in_flight(keep=config.train.steps_in_flight - 1)
                now = time.perf_counter()
                in_flight.append((step, metrics, now - last))
                last = now
                done = step + 1
                want_attention = wandb_cfg.log_attention_maps and done % wandb_cfg.attention_log_interval == 0
                want_pca = wandb_cfg.log_feature_pca and done % wandb_cfg.pca_log_interval == 0
                if want_attention or want_pca:
                    # Dispatched here, fetched and drawn on the logger's thread.
                    logger.log_probe(
                        metrics_fn(state.teacher, probe), probe_meta, done,
                        attention=want_attention, pca=want_pca,
                        channel_names=channel_names,
                    )
                if wandb_cfg.histogram_interval > 0 and done % wandb_cfg.histogram_interval == 0:
                    for name, hist in histograms_fn(state.student).items():
                        logger.log_histogram(name, hist, done)
                if eval_cfg.interval > 0 and (done % eval_cfg.interval == 0 or done == total_steps):
                    logger.log_metrics(_evaluate(state, evaluator, eval_loss, val_batches, mesh) |
                                       {"training/iteration": done}, done)
                if done % config.checkpoint.interval == 0 and done < total_steps:
                    save(done)
                if stop.requested(done):
                    log.info("%s received: saving at step %d and exiting", stop.signal, done)
                    break
            save(int(jax.device_get(state.step)), force=True)
            checkpointer.wait()
            parallel.barrier("end of training", config.distributed.barrier_timeout)
    except BaseException as e:
        if jax.process_count() > 1:
            # The others are blocked in a collective: they stop when this process leaves
            # (distributed.shutdown_timeout) or its heartbeats stop (distributed.heartbeat_timeout).
            log.error("process %d of %d failed: %r; the job stops", jax.process_index(),
                      jax.process_count(), e)
        raise
    finally:
        trace.stop()
        feed.close()
        if progress is not None:
            progress.close()
        checkpointer.close()  # the save in flight lands; finished steps go to the uploader
        logger.finish()  # drains the uploads
        checkpointer.discard_snapshots()
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    # Here, not in main(): main() also runs inside tests and notebooks that own the handlers.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
