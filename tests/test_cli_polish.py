"""The command line teaches: --version, help with defaults and full choice lists at 80
columns, an example per command, progress bars on a terminal and none in a pipe."""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import re
import struct
import subprocess
import termios
import threading
import typing
from pathlib import Path

import numpy as np
import pytest
import typer

from flows.cli import app

from .conftest import unit_rows, write_embeddings
from .test_cli import HANG_GUARD_S, _semdedup_cmd, cli


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("COLUMNS", "LINES")}
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def _help(tmp_path: Path, *command: str) -> str:
    done = subprocess.run([*_semdedup_cmd(), *command, "--help"], env=_env(tmp_path, COLUMNS="80"), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _collapsed(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def test_version_names_semdedup_and_its_engines(tmp_path):
    done = cli(["--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"semdedup {importlib.metadata.version('semdedup')} ")
    for name in ("prefect", "torch"):
        assert f"{name} {importlib.metadata.version(name)}" in line
    assert re.search(r"faiss-(cpu|gpu) \d", line)


def _commands() -> dict[str, list[tuple[str, tuple, object]]]:
    """Per command: (parameter, Literal choices or (), shown default) of every visible option."""
    out = {}
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        params = []
        for name, hint in hints.items():
            if name == "return":
                continue
            kind, *meta = typing.get_args(hint) if typing.get_origin(hint) is typing.Annotated else (hint,)
            info = next((m for m in meta if isinstance(m, typer.models.ParameterInfo)), None)
            if info is None or getattr(info, "hidden", False):
                continue
            literal = next((a for a in (kind, *typing.get_args(kind)) if typing.get_origin(a) is typing.Literal), None)
            params.append((name, typing.get_args(literal) if literal is not None else (), info.show_default))
        out[command.name or command.callback.__name__] = params
    return out


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_at_80_columns_lists_every_choice_and_default_and_an_example(tmp_path, command):
    text = _help(tmp_path, command)
    assert "…" not in text  # nothing cut
    assert "Example: semdedup" in text
    for name, choices, shown_default in _commands()[command]:
        for choice in choices:
            # whole, on one line (not folded inside a word)
            assert re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", text), f"{name}: choice {choice!r} missing"
        if isinstance(shown_default, str):
            assert _collapsed(f"[default: ({shown_default})]") in _collapsed(text), f"{name}: default not shown"
    if command == "run":  # the choice options are there to be checked
        assert sum(bool(choices) for _, choices, _ in _commands()[command]) >= 10


def test_run_help_groups_options_in_panels(tmp_path):
    text = _help(tmp_path, "run")
    panels = re.findall(r"╭─ (\w+) ─", text)
    assert [p for p in panels if p not in ("Arguments", "Options")] == ["Input", "Model", "Dedup", "Tuning", "Storage", "Execution"]


@pytest.fixture
def small_run_args(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    for s in range(2):
        write_embeddings(tmp_path / "in" / f"p{s}.parquet", [f"s{s}-{i}" for i in range(300)], unit_rows(rng, 300, 8))
    return ["run", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / "out"), "--buckets", "2"]


def _under_a_terminal(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a pseudo-terminal (120 columns); what it drew there."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*_semdedup_cmd(), *args], cwd=tmp_path, env=_env(tmp_path, TERM="xterm"), stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its side
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc.stdout.read()
    code = proc.wait(timeout=HANG_GUARD_S)
    reader.join(timeout=10)
    os.close(master)
    return code, drawn.decode("utf-8", errors="replace")


def test_progress_bars_on_a_terminal(tmp_path, small_run_args):
    code, drawn = _under_a_terminal(small_run_args, tmp_path)
    assert code == 0, drawn
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert re.search(r"assigning clusters .*2/2 600 items, [\d,]+ items/s", plain), plain[-2000:]
    assert re.search(r"deduplicating .*2/2 600 items", plain), plain[-2000:]
    assert "ETA" in plain


def test_no_progress_output_without_a_terminal(tmp_path, small_run_args):
    done = cli(small_run_args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "items/s" not in done.stderr + done.stdout
    assert "\x1b[" not in done.stderr  # no cursor movement in logs or pipes


def test_the_progress_hook_sees_every_unit_of_each_mapped_stage(tmp_path, small_run_args):
    from semdedup_core.config import RunConfig
    from semdedup_core.run.dag import progress_listener, run_pipeline

    from .conftest import single_thread

    events = []
    cfg = RunConfig(input=[small_run_args[1]], output=str(tmp_path / "lib"), buckets=2, workers=2)
    with single_thread(), progress_listener(events.append):
        run_pipeline(cfg)
    by_step: dict[str, list] = {}
    for event in events:
        by_step.setdefault(event.step, []).append(event)
    assert set(by_step) == {"assign-shard", "dedup-bucket"}
    for step, seen in by_step.items():
        assert seen[0].units_done == 0 and seen[0].units == 2
        assert [e.units_done for e in seen] == [0, 1, 2]
        assert seen[-1].items_done == 600
    # A listener that left hears nothing more.
    run_pipeline(cfg.model_copy(update={"output": str(tmp_path / "again")}))
    assert len(events) == sum(len(s) for s in by_step.values())
