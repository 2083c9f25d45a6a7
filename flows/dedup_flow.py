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
from semdedup_core.run.stage_results import RecallEstimate, RunSummary, SimilarityHistogram
from semdedup_core.storage import exists, read_json
from tasks.stages import TASKS, plan_run_task, storage_credentials

# Stages long enough to show a progress bar in the UI: the artifact's kind, what a unit is.
_PROGRESS = {EMBED.name: ("embedding", "shards"), DEDUP.name: ("dedup", "buckets")}


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
        progress = _Progress(plan, step, _unit_items(per_unit) or [1] * len(units)) if step.name in _PROGRESS and units else None
        results: list[Any] = [None] * len(units)
        position: dict[PrefectFuture, int] = {}
        waiting = list(range(len(units)))[::-1]
        while waiting or position:
            while waiting and (self.window is None or len(position) < self.window):
                i = waiting.pop()
                position[task.submit(ref, units[i], **{k: v[i] for k, v in per_unit.items()}, **inputs)] = i
            done = next(as_completed(list(position)))
            i = position.pop(done)
            results[i] = done.result()
            if progress is not None:
                progress.advance(i)
        return results


def _unit_items(per_unit: dict[str, Sequence]) -> list[int] | None:
    """Items per unit where the units' partition entries tell (dedup buckets: rows of their row groups)."""
    entries = per_unit.get("entries")
    if entries is None:
        return None
    return [sum(rows for _, groups in bucket for _, _, rows in groups) for bucket in entries]


class _Progress:
    """A progress artifact per long stage of a run, advanced as each unit finishes by that
    unit's share of the work (its items where known, else one unit)."""

    def __init__(self, plan: RunPlan, step: Step, weights: list[int]):
        self.weights = weights if sum(weights) else [1] * len(weights)  # every bucket empty: count units
        self.total = sum(self.weights)
        self.units_done = self.weight_done = 0
        self.what, self.unit = _PROGRESS[step.name]
        self.output = plan.config.output
        self.id = create_progress_artifact(0.0, key=artifact_key(self.output, self.what), description=self._describe())

    def _describe(self) -> str:
        return f"semdedup {self.what} of {self.output}: {self.units_done:,} of {len(self.weights):,} {self.unit} done"

    def advance(self, unit: int) -> None:
        self.units_done += 1
        self.weight_done += self.weights[unit]
        update_progress_artifact(self.id, 100.0 * self.weight_done / self.total, description=self._describe())


@flow(name="semdedup", log_prints=False, validate_parameters=True)
def semdedup_flow(config: RunConfig) -> RunSummary:
    """Semantic deduplication of a dataset; every artifact is written under ``config.output``."""
    with storage_credentials(config.storage_block):
        summary = run_dag(config, PrefectExecutor(config))
        if summary.note is None:
            run_artifacts(summary, RunLayout(summary.output))
            _report_link(summary)
    return summary


# The eps grid of the eps-curve table (the run's own eps is added): the range where SemDeDup's
# eps usually lies, denser where the kept fraction moves fastest.
EPS_GRID = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
# Sources named in the summary: those that lost the largest share of their items.
TOP_LOSERS = 5


def run_artifacts(summary: RunSummary, layout: RunLayout) -> None:
    """The run's artifacts in the Prefect UI, each keyed per output: a markdown summary, the
    eps curve (kept fraction over eps, from result/similarity.json) and, when eps was tuned,
    the tuning table."""
    recall = RecallEstimate.model_validate(read_json(layout.recall_estimate)) if exists(layout.recall_estimate) else None
    create_markdown_artifact(key=artifact_key(summary.output, "summary"), markdown=summary_markdown(summary, layout, recall), description=f"semdedup run summary of {summary.output}")
    if exists(layout.similarity) and summary.eps is not None:
        create_table_artifact(
            key=artifact_key(summary.output, "eps-curve"),
            table=eps_curve_rows(summary, SimilarityHistogram.model_validate(read_json(layout.similarity))),
            description=f"semdedup: kept fraction of the judged items over eps (this run: eps={summary.eps:.6g}); from the stored max_sim, no recomputation",
        )
    if summary.tuning:
        create_table_artifact(
            key=artifact_key(summary.output, "tuning"),
            table=[{"target_keep": summary.target_keep, "tuning": summary.tuning, "eps": summary.eps, "sampled_eps": summary.sampled_eps,
                    "predicted_kept_fraction": summary.predicted_kept_fraction, "kept_fraction": summary.kept_fraction}],
            description="eps tuned to the target kept fraction",
        )


def eps_curve_rows(summary: RunSummary, similarity: SimilarityHistogram) -> list[dict]:
    """eps, kept fraction and kept items on EPS_GRID and at the run's eps. The grid comes from
    the max_sim histogram; the run's own row is what the run decided (exact)."""
    grid = sorted({*EPS_GRID, summary.eps})
    fractions = similarity.kept_fraction_at(grid)
    rows = []
    for eps, fraction in zip(grid, fractions):
        this_run = eps == summary.eps
        kept_fraction = summary.kept_fraction if this_run else float(fraction)
        kept_items = summary.n_kept if this_run else int(round(fraction * similarity.n_judged))
        rows.append({"eps": eps, "kept_fraction": kept_fraction, "kept_items": kept_items, "this_run": this_run})
    return rows


def summary_markdown(summary: RunSummary, layout: RunLayout, recall: RecallEstimate | None) -> str:
    """The run at a glance: counts, shares, eps, warnings, the sources that lost most, the report."""

    def share(n: int, of: int) -> str:
        return f"{n / of:.2%}" if of else "n/a"

    judged = summary.n_judged
    lines = [
        f"### semdedup: {summary.n_kept:,} kept, {summary.n_removed:,} removed, {summary.n_failed:,} failed of {summary.n_input:,} items",
        "",
        "| | items | share |",
        "| --- | ---: | ---: |",
        f"| input | {summary.n_input:,} | |",
        f"| judged (input minus failed) | {judged:,} | {share(judged, summary.n_input)} of input |",
        f"| kept | {summary.n_kept:,} | {share(summary.n_kept, judged)} of judged |",
        f"| removed | {summary.n_removed:,} | {share(summary.n_removed, judged)} of judged |",
        f"| of which exact copies | {summary.n_exact:,} | {share(summary.n_exact, judged)} of judged |",
        f"| failed | {summary.n_failed:,} | {share(summary.n_failed, summary.n_input)} of input |",
        "",
    ]
    threshold = [f"**eps** {summary.eps:.6g}" if summary.eps is not None else "**eps** n/a"]
    if summary.target_keep is not None:
        threshold.append(f"**target kept fraction** {summary.target_keep:.2%}")
        if summary.predicted_kept_fraction is not None:
            threshold.append(f"**sample predicted** {summary.predicted_kept_fraction:.2%} at eps {summary.sampled_eps:.6g}")
    if summary.kept_fraction is not None:
        threshold.append(f"**achieved** {summary.kept_fraction:.2%} kept")
    lines += [" · ".join(threshold), ""]
    if recall is not None:
        lines += [f"**Recall of the cluster-local search (η)** {_describe_recall(recall)}", ""]
    losers = sorted((s for s in summary.per_source if s.removed), key=lambda s: (-s.removed / max(s.input, 1), -s.removed, s.source))[:TOP_LOSERS]
    if losers:
        lines += ["#### Sources that lost the largest share", "", "| source | input | kept | removed | failed | removed share |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| `{_cell(s.source)}` | {s.input:,} | {s.kept:,} | {s.removed:,} | {s.failed:,} | {share(s.removed, s.input)} |" for s in losers]
        lines.append("")
    if summary.warnings:
        lines += ["#### Warnings", "", *(f"- {w}" for w in summary.warnings), ""]
    lines += [f"Report: `{layout.report}`", "", f"Output: `{summary.output}`"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text inside a markdown table cell: a pipe would end the cell, a backtick the code span."""
    return text.replace("|", "\\|").replace("`", "'")


def _describe_recall(recall: RecallEstimate) -> str:
    if recall.skipped:
        return f"not estimated: {recall.skipped}."
    if recall.eta is None:
        return f"n/a: no duplicate pair near any of {recall.sample_items:,} sampled items."
    return (
        f"{recall.eta:.2%}: {recall.pairs_in_cluster:,} of {recall.pairs_in_nearest:,} duplicate pairs of {recall.sample_items:,} sampled items "
        f"lie in their own cluster ({recall.nearest_clusters} nearest clusters searched)."
    )


def _report_link(summary: RunSummary) -> None:
    """A link to the run's report (a file:// URL for a local output)."""
    url = RunLayout(summary.output).report
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    create_link_artifact(key=artifact_key(summary.output, "report"), link=url, link_text="semdedup report", description=f"semdedup report of {summary.output}")
