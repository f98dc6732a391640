"""Experiment trackers fed by our own progress records (job/train/sft.py Progress.on_log), not transformers'
MLflowCallback: the metric names, the run name (our run id) and resuming are ours.

MLflow: the standard variables configure it (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME / _ID,
MLFLOW_TRACKING_TOKEN or _USERNAME + _PASSWORD; MLFLOW_RUN_ID continues a given run). Rank 0 only. The MLflow
run id is kept in status.json (carried to the next attempt), so a resumed attempt continues the same MLflow run
and skips the steps that run already has (one point per logged step). Tracking is best effort: a tracker that
cannot be reached costs a warning, never the training run.
"""
from __future__ import annotations

import json
import logging
import os
import time

from job import redact

log = logging.getLogger("sftjob.train")

# progress-record key → MLflow metric name (eval metrics keep transformers' eval_* names)
METRICS = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch",
           "tokens_per_second": "tokens_per_second", "trained_tokens_per_second": "trained_tokens_per_second",
           "gpu_memory_gb": "gpu_memory_gb"}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested spec → MLflow params: dotted keys, lists as JSON, values cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key[:250]] = (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000]
    return out


class MlflowTracker:
    """One MLflow run per sftjob run: named after the run id, spec as params, output + version as tags."""

    def __init__(self, plan: dict, status):
        self.plan, self.status = plan, status
        self.client = None
        self.run_id: str | None = None
        self.done: dict[str, int] = {}  # metric → last step the MLflow run already has (a resumed attempt)
        self.warned = False

    def _warn(self, what: str, e: BaseException) -> None:
        if not self.warned:
            log.warning("mlflow: %s: %s (training goes on without tracking)", what,
                        redact.text(f"{type(e).__name__}: {e}")[:300])
        self.warned = True

    def start(self) -> None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            log.warning("report_to mlflow, but MLFLOW_TRACKING_URI is not set: not tracking "
                        "(set it, e.g. the chart's mlflow.trackingUri)")
            return
        # an unreachable server must not hold a training step for minutes (the client's default retries)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 - best effort: the server, auth or the network
            self.client = None
            self._warn("could not start the run", e)

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        from job import version

        client = MlflowClient()
        doc = self.status.read() if self.status else {}
        run_name = doc.get("run_id") or "sftjob"
        existing = os.environ.get("MLFLOW_RUN_ID") or doc.get("mlflow_run_id")
        if existing:
            run = client.get_run(existing)
            client.update_run(existing, status="RUNNING")
            for key in run.data.metrics:
                hist = client.get_metric_history(existing, key)
                self.done[key] = max((m.step for m in hist), default=-1)
            self.run_id = existing
            log.info("mlflow: continuing run %s (%s)", existing, run_name)
        else:
            exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
            if not exp_id and name:
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else client.create_experiment(name)
            tags = {"sftjob.run_id": run_name, "sftjob.output": redact.text(self.plan.get("output_uri") or ""),
                    "sftjob.version": version()}
            run = client.create_run(exp_id or "0", run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            params = flatten(redact.data(self.plan.get("spec") or {}))
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=items[i:i + 100])
            log.info("mlflow: run %s (%s) in experiment %s", self.run_id, run_name, exp_id or "0")
        self.client = client
        if self.status:  # the next attempt continues this MLflow run
            self.status.update(mlflow_run_id=self.run_id)

    def log(self, step: int, values: dict, when: float | None = None) -> None:
        """One point per metric at `step`; steps the run already has (before a resume) are skipped."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int((when or time.time()) * 1000)
        metrics = [Metric(k, float(v), ts, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and step > self.done.get(k, -1)]
        if not metrics:
            return
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # noqa: BLE001
            self._warn("could not log metrics", e)

    def progress(self, rec: dict) -> None:
        self.log(rec["step"], {name: rec.get(key) for key, name in METRICS.items()}, rec.get("time"))

    def eval(self, step: int, logs: dict) -> None:
        self.log(step, {k: v for k, v in logs.items() if k.startswith("eval_")})

    def end(self, interrupted: bool) -> None:
        if self.client is None:
            return
        try:  # KILLED: a later attempt reopens it (RUNNING) and goes on
            self.client.set_terminated(self.run_id, status="KILLED" if interrupted else "FINISHED")
        except Exception as e:  # noqa: BLE001
            self._warn("could not end the run", e)


def trackers(report_to: list[str], plan: dict, status, rank: int) -> list:
    """The trackers we run ourselves (rank 0 only); transformers gets report_to without them."""
    if rank != 0 or "mlflow" not in report_to:
        return []
    t = MlflowTracker(plan, status)
    t.start()
    return [t]


def for_transformers(report_to: list[str]) -> list[str] | str:
    """report_to as TrainingArguments gets it: without the trackers this module runs."""
    rest = [r for r in report_to if r != "mlflow"]
    return rest or "none"


def tensorboard_dir(workdir) -> str:
    """Where TensorBoardCallback writes (published as <output>/tensorboard/)."""
    return os.path.join(str(workdir), "tensorboard")
