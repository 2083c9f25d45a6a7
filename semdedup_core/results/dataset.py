"""Write the deduplicated dataset back in the input's own format.

With ``write_dataset`` the kept items go to ``{output}/dataset/``, with ``write_removed``
the removed ones to ``{output}/removed/``, one output per input shard and under the same
file name:

- webdataset tars: only the chosen samples, every file of a sample (image, txt, json, ...)
  byte for byte, in input order;
- parquet (raw or precomputed embeddings): the chosen rows with every column;
- jsonl: the chosen lines verbatim (same compression as the input);
- image folders: ``images-N.txt``, the URLs of the chosen files, one per line.

Failed items go to neither (they are listed in ``result/failed.parquet``).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.utils import infer_compression

from semdedup_core.inputs.datasets import RawShard, compressed_writer, jsonl_lines, split_key
from semdedup_core.run.plan import RunPlan
from semdedup_core.run.stage_results import WrittenShard
from semdedup_core.inputs.precomputed import InputError, _open_parquet, canonical_id_array, one_line
from semdedup_core.storage import atomic_open, exists, filesystem, parquet_writer, read_json, read_parquet, write_bytes

KEPT, REMOVED, FAILED = "kept", "removed", "failed"


def write_shard(plan: RunPlan, shard_index: int) -> WrittenShard:
    """Write one input shard's kept (and/or removed) items; the result names what was written
    (an earlier run may have written the other half)."""
    layout, cfg = plan.layout, plan.config
    wanted = {KEPT: cfg.write_dataset, REMOVED: cfg.write_removed}
    done_url = layout.written(shard_index)
    previous = read_json(done_url) if exists(done_url) else {}
    targets = {k: (layout.dataset if k == KEPT else layout.removed_dataset) for k, w in wanted.items() if w}
    decide = _decider(plan)
    counts = {KEPT: 0, REMOVED: 0, FAILED: 0}
    if plan.embeds:
        shard = plan.sources[shard_index]
        writer = {"webdataset": _write_tar, "parquet": _write_parquet, "jsonl": _write_jsonl, "images": _write_file_list}[shard.kind]
        writer(plan, shard, targets, decide, counts)
    else:
        s = plan.shards[shard_index]
        shard = RawShard(index=s.index, kind="parquet", url=s.url, modality="text", id_column=s.id_column)
        _write_parquet(plan, shard, targets, decide, counts)
    return WrittenShard(shard=shard_index, **{k: bool(previous.get(k)) or w for k, w in wanted.items()}, counts=counts)


def _decider(plan: RunPlan) -> Callable[[pa.Array], np.ndarray]:
    """ids -> array of kept/removed/failed, from the run's result files."""
    removed = read_parquet(plan.layout.removed, columns=["id"]).column("id").combine_chunks()
    failed = read_parquet(plan.layout.failed, columns=["id"]).column("id").combine_chunks()

    def decide(ids: pa.Array) -> np.ndarray:
        out = np.full(len(ids), KEPT, dtype=object)
        out[pc.is_in(ids, value_set=removed).to_numpy(zero_copy_only=False)] = REMOVED
        out[pc.is_in(ids, value_set=failed).to_numpy(zero_copy_only=False)] = FAILED
        return out

    return decide


@contextmanager
def _outputs(targets: dict[str, Callable[[str], str]], name: str):
    """One atomically written binary file per wanted decision (kept / removed)."""
    with ExitStack() as stack:
        yield {k: stack.enter_context(atomic_open(url_of(name))) for k, url_of in targets.items()}


def _write_tar(plan: RunPlan, shard: RawShard, targets, decide, counts: dict[str, int]) -> None:
    scan = read_parquet(plan.layout.scan(shard.index), columns=["id"])
    decision = dict(zip(scan.column("id").to_pylist(), decide(scan.column("id").combine_chunks())))
    for d in decision.values():
        counts[d] += 1
    fs, path = filesystem(shard.url)
    with _outputs(targets, shard.basename) as files, ExitStack() as stack:
        tars = {k: stack.enter_context(tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT)) for k, fh in files.items()}
        try:
            with fs.open(path, "rb") as fh:
                archive = tarfile.open(fileobj=fh, mode="r|")
                for info in archive:
                    if not info.isfile():
                        continue
                    out = tars.get(decision.get(split_key(info.name)[0], FAILED))
                    data = archive.extractfile(info).read()
                    if out is not None:
                        out.addfile(info, io.BytesIO(data))
        except (tarfile.TarError, EOFError, OSError):
            pass  # a cut-off or unreadable tar: what came before is written, the rest is in failed


def _write_parquet(plan: RunPlan, shard: RawShard, targets, decide, counts: dict[str, int]) -> None:
    """Row group by row group. Raw parquet is decided by row from the scan (an item whose id
    was unusable is failed under its synthetic id there), so a row group whose rows all
    failed (unreadable, say) is not read again; precomputed shards by their ids."""
    pf = _open_parquet(shard.url)
    by_row = None
    if plan.embeds:
        scan = read_parquet(plan.layout.scan(shard.index), columns=["row", "id"])
        by_row = np.full(pf.metadata.num_rows, FAILED, dtype=object)
        by_row[scan.column("row").to_numpy()] = decide(scan.column("id").combine_chunks())
    with ExitStack() as stack:
        writers = {k: stack.enter_context(parquet_writer(url_of(shard.basename), pf.schema_arrow)) for k, url_of in targets.items()}
        start = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if by_row is not None and (by_row[start : start + n] == FAILED).all():
                counts[FAILED] += n
                start += n
                continue
            for batch in _row_group_batches(pf, group, shard.url):
                if by_row is None:
                    decisions = decide(canonical_id_array(batch.column(batch.schema.get_field_index(shard.id_column))))
                else:
                    decisions = by_row[start : start + batch.num_rows]
                for k in counts:
                    counts[k] += int((decisions == k).sum())
                for k, writer in writers.items():
                    writer.write_batch(batch.filter(pa.array(decisions == k)))
                start += batch.num_rows


def _row_group_batches(pf, group: int, url: str):
    batches = pf.iter_batches(batch_size=8192, row_groups=[group])
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001 - kept or removed rows that cannot be read back
            raise InputError(f"{url}: row group {group} cannot be read back to write the dataset ({one_line(exc)})") from exc
        if batch is None:
            return
        yield batch


def _write_jsonl(plan: RunPlan, shard: RawShard, targets, decide, counts: dict[str, int]) -> None:
    scan = read_parquet(plan.layout.scan(shard.index), columns=["row", "id"])
    decision = dict(zip(scan.column("row").to_pylist(), decide(scan.column("id").combine_chunks())))
    for d in decision.values():
        counts[d] += 1
    fs, path = filesystem(shard.url)
    compression = infer_compression(shard.url)
    with _outputs(targets, shard.basename) as files, ExitStack() as stack:
        outs: dict[str, BinaryIO] = {k: stack.enter_context(compressed_writer(fh, compression)) for k, fh in files.items()}
        with fs.open(path, "rb") as fh:
            for line_no, line in enumerate(jsonl_lines(fh, compression)):
                if isinstance(line, Exception):
                    break  # the rest of a cut-off file is in failed
                out = outs.get(decision.get(line_no, FAILED))
                if out is not None:
                    out.write(line if line.endswith(b"\n") else line + b"\n")


def _write_file_list(plan: RunPlan, shard: RawShard, targets, decide, counts: dict[str, int]) -> None:
    scan = read_parquet(plan.layout.scan(shard.index), columns=["id", "source"])
    decisions = decide(scan.column("id").combine_chunks())
    for k in counts:
        counts[k] += int((decisions == k).sum())
    sources = np.array(scan.column("source").to_pylist(), dtype=object)
    for k, url_of in targets.items():
        lines = "".join(f"{u}\n" for u in sources[decisions == k])
        write_bytes(url_of(f"images-{shard.index:05d}.txt"), lines.encode())
