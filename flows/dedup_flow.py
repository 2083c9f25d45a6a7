"""The semdedup flow: the DAG of semdedup_core.run.dag, each unit a Prefect task.

The flow runs the same ``run_dag`` as the in-process runner, with an executor that submits
every unit to the flow's task runner: threads by default, Dask or Ray when the flow is run
``with_options(task_runner=...)`` (the CLI's ``--task-runner``). See docs/architecture.md
§"Executors".
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from semdedup_core.config import RunConfig
from semdedup_core.run.collection import NothingNew
from semdedup_core.run.dag import DEDUP, EMBED, R, Step, run_dag
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.plan import PlanRef, RunPlan, store_plan
from semdedup_core.run.stage_results import RunSummary
from tasks.stages import TASKS, plan_run_task, storage_credentials

# Stages long enough to show a progress bar in the UI.
_PROGRESS = {EMBED.name: "embedding", DEDUP.name: "dedup"}


def artifact_key(output: str, kind: str) -> str:
    """A key per output (Prefect keys: lowercase letters, digits, dashes), so each output's
    artifacts keep their own history in the UI."""
    slug = re.sub(r"[^a-z0-9]+", "-", output.lower()).strip("-")[-40:].strip("-")
    digest = hashlib.blake2b(output.encode(), digest_size=4).hexdigest()
    return f"semdedup-{kind}-{slug}-{digest}"


class PrefectExecutor:
    """Units as Prefect tasks on the flow's task runner.

    On the default thread pool at most ``workers`` units are submitted at a time, so a task
    is Running only while it computes; other runners (Dask, Ray) get every unit at once and
    schedule them on their own workers.
    """

    def __init__(self, config: RunConfig):
        runner = FlowRunContext.get().task_runner
        self.window = config.workers if isinstance(runner, ThreadPoolTaskRunner) else None
        self._stored: tuple[RunPlan, PlanRef] | None = None

    def plan(self, cfg: RunConfig) -> RunPlan:
        planned = plan_run_task(cfg)
        if isinstance(planned, str):
            raise NothingNew(planned)
        return planned

    def _ref(self, plan: RunPlan) -> PlanRef:
        """Tasks get the plan by reference, stored once per version of the plan."""
        if self._stored is None or self._stored[0] is not plan:
            self._stored = (plan, store_plan(plan))
        return self._stored[1]

    def run(self, step: Step[R], plan: RunPlan, **inputs: Any) -> R:
        return TASKS[step.name].submit(self._ref(plan), **inputs).result()

    def map(self, step: Step[R], plan: RunPlan, units: Sequence[int], per_unit: dict[str, Sequence] | None = None, **inputs: Any) -> list[R]:
        task, per_unit, ref = TASKS[step.name], per_unit or {}, self._ref(plan)
        progress = _Progress(plan, step, len(units)) if step.name in _PROGRESS and len(units) > 1 else None
        results: list[Any] = [None] * len(units)
        position: dict[PrefectFuture, int] = {}
        waiting = list(range(len(units)))[::-1]
        while waiting or position:
            while waiting and (self.window is None or len(position) < self.window):
                i = waiting.pop()
                position[task.submit(ref, units[i], **{k: v[i] for k, v in per_unit.items()}, **inputs)] = i
            done = next(as_completed(list(position)))
            results[position.pop(done)] = done.result()
            if progress is not None:
                progress.advance()
        return results


class _Progress:
    """A progress artifact per long stage of a run, updated as its units finish."""

    def __init__(self, plan: RunPlan, step: Step, total: int):
        self.total, self.done = total, 0
        what = _PROGRESS[step.name]
        self.id = create_progress_artifact(0.0, key=artifact_key(plan.config.output, what), description=f"semdedup {what}: {total} units of {plan.config.output}")

    def advance(self) -> None:
        self.done += 1
        update_progress_artifact(self.id, 100.0 * self.done / self.total)


@flow(name="semdedup", log_prints=False, validate_parameters=True)
def semdedup_flow(config: RunConfig) -> RunSummary:
    """Semantic deduplication of a dataset; every artifact is written under ``config.output``."""
    with storage_credentials(config.storage_block):
        summary = run_dag(config, PrefectExecutor(config))
    if summary.note is None:
        _summary_artifacts(summary)
        _report_link(summary)
    return summary


def _summary_artifacts(summary: RunSummary) -> None:
    fraction = f"{summary.kept_fraction:.2%}" if summary.kept_fraction is not None else "n/a"
    create_markdown_artifact(
        key=artifact_key(summary.output, "summary"),
        markdown=(
            f"### semdedup: {summary.n_kept:,} kept, {summary.n_removed:,} removed, {summary.n_failed:,} failed\n\n"
            f"of {summary.n_input:,} items at eps={summary.eps:.6g} (kept {fraction} of the judged items).\n\n"
            f"Output: `{summary.output}`"
            + "".join(f"\n\n**warning:** {w}" for w in summary.warnings)
        ),
        description=f"semdedup run summary of {summary.output}",
    )
    if summary.tuning:
        create_table_artifact(
            key=artifact_key(summary.output, "tuning"),
            table=[{"target_keep": summary.target_keep, "tuning": summary.tuning, "eps": summary.eps, "sampled_eps": summary.sampled_eps,
                    "predicted_kept_fraction": summary.predicted_kept_fraction, "kept_fraction": summary.kept_fraction}],
            description="eps tuned to the target kept fraction",
        )


def _report_link(summary: RunSummary) -> None:
    """A link to the run's report (a file:// URL for a local output)."""
    url = RunLayout(summary.output).report
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    create_link_artifact(key=artifact_key(summary.output, "report"), link=url, link_text="semdedup report", description=f"semdedup report of {summary.output}")
