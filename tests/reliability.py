"""pytest plugin: the fault-injection table (RELIABILITY.md) is written from a real test run.

A test marked ``@pytest.mark.fault`` takes the ``fault_row`` fixture and records what it injected and what it
measured::

    fault_row(area="training", fault="SIGKILL between checkpoints",
              happened=f"killed at step {killed}; resumed from step {resumed}",
              lost=f"{redone} steps redone, {equal}/{total} weight tensors bitwise equal")

Rows count only for tests that passed (setup, call and teardown). With ``--reliability-table PATH`` the table is
written atomically at the end of the session, under the hand-written intro kept above :data:`MARKER`; without the
option the fixture records nothing, so a plain ``pytest`` run is unchanged.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipline.io import atomic_write_text

MARKER = "<!-- generated below this line by `make reliability`; edit the text above it only -->"
DEFAULT_INTRO = "# Reliability\n\nRegenerate the table below with `make reliability`.\n"
AREAS = ("training", "data", "data prep", "eval", "hostile input", "config", "load")
"""Table order; a row with another area goes last."""


@dataclass(frozen=True)
class Row:
    area: str
    fault: str
    happened: str
    lost: str
    nodeid: str


class Recorder:
    """Rows per test until the test's outcome is known; kept rows and outcomes for the table. Registered as a
    plugin object, so its methods below are pytest hooks."""

    def __init__(self, path: Path | None, command: str):
        self.path, self.command = path, command
        self.pending: dict[str, list[Row]] = {}
        self.kept: list[Row] = []
        self.outcome: dict[str, str] = {}
        self.started = time.monotonic()

    def record(self, row: Row) -> None:
        if self.path is not None:
            self.pending.setdefault(row.nodeid, []).append(row)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        if report.failed:
            self.outcome[nodeid] = "failed"
        elif report.skipped and self.outcome.get(nodeid) != "failed":
            self.outcome[nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcome.setdefault(nodeid, "passed")
        if report.when == "teardown":
            rows = self.pending.pop(nodeid, [])
            if self.outcome.get(nodeid) == "passed":
                self.kept += rows

    def render(self) -> str:
        counts = Counter(self.outcome.values())
        order = {area: i for i, area in enumerate(AREAS)}
        rows = sorted(self.kept, key=lambda r: order.get(r.area, len(AREAS)))  # stable: run order within an area
        lines = [
            f"Generated {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {platform.node() or 'this host'} "
            f"({os.cpu_count()} cores) by:",
            "",
            f"    {self.command}",
            "",
            f"**{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped** in "
            f"{time.monotonic() - self.started:.0f} s; {len(rows)} rows (a test that did not pass writes none).",
            "",
            "| area | fault | what happened | lost | test |",
            "|---|---|---|---|---|",
            *(f"| {_cell(r.area)} | {_cell(r.fault)} | {_cell(r.happened)} | {_cell(r.lost)} | `{_cell(r.nodeid)}` |"
              for r in rows),
        ]
        failed = sorted(n for n, o in self.outcome.items() if o == "failed")
        if failed:
            lines += ["", "Failed:", "", *(f"- `{n}`" for n in failed)]
        return "\n".join(lines) + "\n"

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.path is not None:
            self.write()

    def write(self) -> None:
        intro = DEFAULT_INTRO
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if MARKER in text:
                intro = text.split(MARKER, 1)[0]
        atomic_write_text(self.path, intro.rstrip("\n") + "\n\n" + MARKER + "\n\n" + self.render())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _command(config: pytest.Config) -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(config.rootpath)  # .venv/bin/python, as the Makefile writes it
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [str(python), "-m", "pytest", *config.invocation_params.args])


_RECORDER = pytest.StashKey[Recorder]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-table", metavar="PATH", default=None,
                     help="write the fault table (rows of passed tests using the fault_row fixture) to PATH, "
                          "keeping the text above its marker line")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault: a fault-injection, hostile-input or load test that records a row "
                                       "of RELIABILITY.md (`pytest -m fault` runs the suite)")
    path = config.getoption("--reliability-table")
    recorder = Recorder(config.invocation_params.dir / path if path else None, _command(config))
    config.stash[_RECORDER] = recorder
    config.pluginmanager.register(recorder, "reliability-recorder")


@pytest.fixture
def fault_row(request: pytest.FixtureRequest):
    """``fault_row(area=..., fault=..., happened=..., lost=...)``: one row of the fault table for this test.
    ``happened`` and ``lost`` must be built from what the test measured (steps, counts, exit codes, seconds)."""
    recorder = request.config.stash[_RECORDER]
    if request.node.get_closest_marker("fault") is None:
        pytest.fail(f"{request.node.nodeid} records a fault row but is not marked @pytest.mark.fault, "
                    f"so `pytest -m fault` would not run it")

    def record(*, area: str, fault: str, happened: str, lost: str) -> None:
        for name, value in (("area", area), ("fault", fault), ("happened", happened), ("lost", lost)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"fault_row: {name} must be a non-empty string, got {value!r}")
        recorder.record(Row(area, fault, happened, lost, request.node.nodeid))

    return record
