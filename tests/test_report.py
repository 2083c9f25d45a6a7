"""The report of real runs (raw text, images) rendered in headless Chromium: every section,
every plot and thumbnail decodes, no console error, a screenshot that is not blank."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import png_bytes, raw_config, run_raw, write_tar

SECTIONS = ["overview", "eps-curve", "similarity", "pairs", "borderline", "sources", "failures", "long-texts", "clusters", "kmeans", "recall"]


def chromium() -> str:
    """Debian's chromium (installed by .ci/run and README command 2)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: apt-get install -y chromium"
    return path


def _chromium(page: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def load(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """The DOM headless Chromium builds from ``page``, and every console message it logged
    (the report has no script: any message, an uncaught error or a failed load, is a fault)."""
    dump = _chromium(page, "--dump-dom", tmp=tmp)
    assert dump.returncode == 0, dump.stderr[-2000:]
    return dump.stdout, [line for line in dump.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_the_console_check_sees_script_errors_and_failed_loads(tmp_path):
    page = tmp_path / "faulty.html"
    page.write_text('<html><body><img src="missing.png"><script>console.error("boom"); throw new Error("uncaught")</script></body></html>')
    _, console = load(page, tmp_path)
    assert any("boom" in line for line in console) and any("Uncaught" in line for line in console)


class _Page(HTMLParser):
    """Section ids and image sources of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])


def _svg_documents(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def check_rendered(report: Path, tmp: Path) -> tuple[str, str]:
    """Load the report in headless Chromium; returns (the DOM it built, the raw page)."""
    raw = report.read_text()
    assert "None" not in re.sub(r"<svg\b.*?</svg>", "", raw, flags=re.S), "a None reached the page"
    assert not re.search(r"\d\.\d{9,}", re.sub(r"<svg\b.*?</svg>", "", raw, flags=re.S)), "a raw float reached the page"
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", raw), "the page loads something from the network"
    dom, console = load(report, tmp)
    assert not console, console
    parsed = _Page()
    parsed.feed(dom)
    assert parsed.sections == SECTIONS
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
            assert image.width > 0 and image.height > 0
    svgs = _svg_documents(raw)
    assert len(svgs) >= 4  # eps curve, histogram, cluster sizes, k-means
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg") and len(list(root.iter())) > 20
    shot = tmp / "shot.png"
    taken = _chromium(report, f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars", tmp=tmp)
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.std() > 5, "the screenshot is blank"
    return dom, raw


def _texts(rng: np.random.Generator, n: int) -> list[str]:
    """Texts over the tiny tokenizer's words, many near copies of a few originals."""
    originals = [" ".join(f"w{w}" for w in rng.integers(0, 60, 30)) for _ in range(8)]
    texts = []
    for i in range(n):
        words = originals[i % len(originals)].split()
        for at in rng.choice(len(words), int(rng.integers(0, 12)), replace=False):
            words[at] = f"w{rng.integers(0, 60)}"
        texts.append(" ".join(words))
    return texts


def test_report_of_a_text_run_renders_with_every_section(tiny_bert, tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    data.mkdir()
    texts = _texts(rng, 120)
    for part in range(2):
        lines = [json.dumps({"id": f"doc-{part}-{i}", "text": t}) for i, t in enumerate(texts[part * 60 : (part + 1) * 60])]
        lines.append(json.dumps({"id": f"empty-{part}", "text": ""}))  # fails: empty text
        (data / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = raw_config([data], tmp_path / "out", model=str(tiny_bert), target_keep=0.6, tuning="sample", clusters=3)
    run_raw(cfg)
    summary = json.loads((tmp_path / "out/result/summary.json").read_text())
    report = tmp_path / "out/report/index.html"
    dom, raw = check_rendered(report, tmp_path)
    pairs = pq.read_table(tmp_path / "out/result/pairs.parquet").to_pylist()
    assert {p["kind"] for p in pairs} == {"sample", "above", "below"}
    threshold = 1 - summary["eps"]
    assert all(p["max_sim"] > threshold and not p["kept"] for p in pairs if p["kind"] in ("sample", "above"))
    assert all(p["max_sim"] <= threshold and p["kept"] for p in pairs if p["kind"] == "below")
    # The texts of a sampled pair are on the page, their differing words marked.
    sampled = next(p for p in pairs if p["kind"] == "sample")
    by_id = {f"doc-{part}-{i}": t for part in range(2) for i, t in enumerate(texts[part * 60 : (part + 1) * 60])}
    assert " ".join(by_id[sampled["id"]].split()[:3]) in re.sub(r"</?mark>", "", dom)
    assert "<mark>" in dom
    assert f"{summary['n_input']:,}" in dom and "text is empty" in dom
    recall = json.loads((tmp_path / "out/clustering/recall.json").read_text())
    if recall["eta"] is None:
        assert "η not estimated" in dom
    else:  # the estimate's own counts are on the page
        assert f"{recall['pairs_in_cluster']:,} lie inside one cluster" in dom and f"of the {recall['pairs_in_nearest']:,} duplicate pairs" in dom
    assert f"{summary['n_kept']:,} ({summary['kept_fraction']:.1%} of judged)" in dom


def test_report_of_an_image_run_shows_thumbnails(tiny_clip, tmp_path):
    rng = np.random.default_rng(5)
    bases = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    samples = []
    for i in range(40):
        noisy = np.clip(bases[i % 5].astype(int) + rng.integers(-6, 7, (32, 32, 3)), 0, 255).astype(np.uint8)
        samples.append({"__key__": f"img{i:03d}", "jpg": png_bytes(noisy, fmt="JPEG")})
    samples.append({"__key__": "broken", "jpg": b"not an image"})
    tar = write_tar(tmp_path / "data/shard-00000.tar", samples)
    cfg = raw_config([tar], tmp_path / "out", model=tiny_clip, eps=0.02, clusters=2)
    run_raw(cfg)
    dom, raw = check_rendered(tmp_path / "out/report/index.html", tmp_path)
    parsed = _Page()
    parsed.feed(dom)
    pairs = pq.read_table(tmp_path / "out/result/pairs.parquet")
    # Every pair shown: the earlier item's and the other item's thumbnail, from the tar's bytes.
    assert pairs.num_rows and len(parsed.images) == 2 * pairs.num_rows


def test_report_command_rerenders_from_stored_artifacts(tiny_bert, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    texts = _texts(np.random.default_rng(9), 40)
    (data / "a.jsonl").write_text("\n".join(json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)) + "\n")
    out = tmp_path / "out"
    run_raw(raw_config([data], out, model=str(tiny_bert), eps=0.01))
    report = out / "report/index.html"
    report.unlink()
    # --open hands the page to the browser named by BROWSER (here a script noting what it got).
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {tmp_path / "opened.txt"}\n')
    browser.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "report", str(out), "--open"], capture_output=True, text=True, timeout=300, env={**_env(), "BROWSER": str(browser)})
    assert done.returncode == 0, done.stderr
    assert report.exists() and str(report) in " ".join(done.stdout.split())
    assert (tmp_path / "opened.txt").read_text().strip() == report.resolve().as_uri()
    check_rendered(report, tmp_path)
    missing = subprocess.run([sys.executable, "-m", "flows.cli", "report", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=300, env=_env())
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")] if p)}


def test_flow_renders_the_report_as_its_own_task_and_links_it(prefect_harness, tmp_path):
    """Under Prefect: the report is a task of the flow, a link artifact points at it, and a run
    on precomputed embeddings says that it holds no content to show."""
    from prefect.client.orchestration import get_client

    from flows.dedup_flow import artifact_key, semdedup_flow
    from semdedup_core.config import RunConfig
    from tests.conftest import unit_rows, write_embeddings

    rng = np.random.default_rng(4)
    centres = unit_rows(rng, 6, 16)
    vectors = centres[np.arange(90) % 6] + 0.05 * rng.standard_normal((90, 16)).astype(np.float32)
    write_embeddings(tmp_path / "emb.parquet", [f"v{i}" for i in range(90)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    out = tmp_path / "out"
    semdedup_flow(config=RunConfig(input=[str(tmp_path / "emb.parquet")], output=str(out), eps=0.02, clusters=3))
    marker = json.loads((out / "report/report.json").read_text())
    assert marker["sections"] == SECTIONS and marker["n_pairs"] > 0
    dom, _ = check_rendered(out / "report/index.html", tmp_path)
    assert "precomputed embeddings: the run holds only ids" in dom
    with get_client(sync_client=True) as client:
        links = [a for a in client.read_artifacts(limit=200) if a.key == artifact_key(str(out), "report")]
        names = {t.name for t in client.read_task_runs(limit=200)}
    # Prefect stores a link artifact as markdown: [text](url).
    assert len(links) == 1 and links[0].data == f"[semdedup report]({(out / 'report/index.html').resolve().as_uri()})"
    assert any(name.startswith("render-report") for name in names)
