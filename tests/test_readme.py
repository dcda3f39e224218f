"""The README, checked as a new user would try it, so it cannot drift from the code.

- Each quick start (``<!-- doc-test: NAME-app -->``) is saved as ``app.py`` in an empty directory and
  served by the command its ``NAME-run`` block shows (a real uvicorn or gunicorn, memory store); every
  other ``$`` line of that block runs in a shell, and its output must be the lines the README shows.
- The test command is what ``.ci/run`` extracts (with ``.ci/run``'s own awk program), in the form it
  requires, and installs what the CI gates run (the ``docs`` extra for ``mkdocs build --strict``).
- The benchmark table's figures are the ones in ``bench/results/*.json``.
- Every relative link resolves to a file of the checkout (and a ``#fragment`` to one of its headings).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.budgets import Budgets
from tests.redis_server import free_port
from tests.servers import stop

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "bench" / "results"
_FENCED = re.compile(r"<!-- doc-test: (?P<name>[a-z0-9-]+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)
_TABLE = re.compile(r"<!-- doc-test: (?P<name>[a-z0-9-]+) -->\n(?P<body>(?:\|.*\n)+)")
EN_DASH, TIMES = "\u2013", "\u00d7"  # as the README writes ranges and ratios
_SERVERS = {"uvicorn": ["-m", "uvicorn", "app:app", "--port", "{port}"],
            "gunicorn": ["-m", "gunicorn", "app:app", "--bind", "127.0.0.1:{port}"]}


def _blocks() -> dict[str, str]:
    return {m["name"]: m["body"] for m in _FENCED.finditer(README)}


def _commands(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the output lines the README shows after it)."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


@contextmanager
def _served(command: str, workdir: Path, budgets: Budgets) -> Iterator[int]:
    """The server the README's command starts, on a free port instead of 8000; the port once it answers."""
    name, *rest = shlex.split(command)
    assert name in _SERVERS and rest == ["app:app"], f"not a server command the README test knows: {command}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CACHEMW_REDIS_URL"}  # the snippets' memory store
    args = [a.format(port=port) for a in _SERVERS[name]]
    process = subprocess.Popen([sys.executable, *args], cwd=workdir, env=env)
    try:
        deadline = time.monotonic() + budgets.process_start
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)  # any answer: the server is up
                break
            except httpx.TransportError:
                assert process.poll() is None, f"{command} exited with {process.returncode}"
                assert time.monotonic() < deadline, f"{command} did not start"
                time.sleep(0.05)
        yield port
    finally:
        stop(process)


def _shell(command: str, port: int, workdir: Path) -> list[str]:
    assert shutil.which("curl"), "the README's commands use curl. HINT: apt-get install -y curl"
    done = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")], cwd=workdir,
                          capture_output=True, text=True, timeout=60, check=False)
    return [line.rstrip("\r") for line in done.stdout.splitlines()]


@pytest.mark.parametrize("name", ["starlette", "fastapi", "flask"])
def test_each_quick_start_answers_as_the_readme_shows(name: str, tmp_path: Path, budgets: Budgets) -> None:
    blocks = _blocks()
    (tmp_path / "app.py").write_text(blocks[f"{name}-app"])
    (server, shown), *steps = _commands(blocks[f"{name}-run"])
    assert not shown and steps, f"{name}-run: a server command, then commands with their output"
    with _served(server, tmp_path, budgets) as port:
        seen: set[str] = set()
        for command, expected in steps:
            output = _shell(command, port, tmp_path)
            # The README's reader types a repeat after the first answer arrived; the entry is stored after the
            # response is sent, so a repeated command gets until the condition budget to show the cached answer.
            deadline = time.monotonic() + budgets.condition
            while command in seen and output != expected and time.monotonic() < deadline:
                time.sleep(0.05)
                output = _shell(command, port, tmp_path)
            assert output == expected, f"{name}: $ {command}"
            seen.add(command)


def test_the_test_command_is_what_ci_runs_and_installs_the_gates() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    [awk] = re.findall(r"command=\$\(awk '(.*?)' README\.md\)", ci, re.S)
    extracted = subprocess.run(["awk", awk, "README.md"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    setup, _, tests = extracted.rpartition(" && ")
    assert tests.startswith(".venv/bin/pytest") and setup, extracted  # the form .ci/run requires
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'", setup)
    assert extras is not None and {"test", "docs"} <= set(extras[1].split(",")), setup
    for gate in ("gate ruff .venv/bin/ruff check .", "gate mypy .venv/bin/mypy",
                 "gate mkdocs .venv/bin/mkdocs build --strict", 'gate pytest bash -c "$tests"'):
        assert gate in ci
    # The docs' own copy of the line (docs/development.md) is the same line.
    assert extracted in (ROOT / "docs" / "development.md").read_text()


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}{EN_DASH}{max(values):.2f}"


def test_the_benchmark_table_quotes_the_results_files() -> None:
    [body] = [m["body"] for m in _TABLE.finditer(README) if m["name"] == "benchmarks"]
    rows = {cells[0]: cells[1] for cells in (line.strip("|").split(" | ") for line in body.splitlines()[2:])}
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    peers = {t["target"]: t["median"] for t in json.loads((RESULTS / "peers.json").read_text())["targets"]}
    runs = json.loads((RESULTS / "overload.json").read_text())["runs"]
    staleness = json.loads((RESULTS / "staleness.json").read_text())
    miss_run = json.loads((RESULTS / "peers-miss.json").read_text())
    miss = miss_run["targets"][0]
    cpu = {case["case"]: case["cpu_us"] for case in miss_run["cases"]}  # per round, in round order
    miss_cpu = statistics.median(m / u for u, m in zip(cpu["uncached-miss"], cpu["cachemw-fastapi-miss"], strict=True))
    topologies = {results: [statistics.median(r["rps"] for r in hits[name]["per_round"])
                            for name in ("cluster", "sentinel", "tls")]
                  for results in ("cluster", "cluster-redis-elsewhere")
                  for hits in [json.loads((RESULTS / f"{results}.json").read_text())["summary"]["hits"]]}
    purges = [run for phase in staleness["results"].values() for run in phase]
    cold = {lib: _range([r["cold_ratio"] for r in runs if r["library"] == lib])
            for lib in ("cachemw", "fastapi-cache2", "cashews")}
    expected = {
        "cachemw hit on Redis vs fastapi-cache2 hit on Redis (FastAPI, req/s)":
            f"{peers['cachemw hit on Redis vs fastapi-cache2 hit on Redis (FastAPI, req/s)']:.2f}{TIMES}",
        "cachemw hit on Redis vs cashews hit on Redis (FastAPI, req/s)":
            f"{peers['cachemw hit on Redis vs cashews hit on Redis (FastAPI, req/s)']:.2f}{TIMES}",
        "cachemw miss vs the uncached app (FastAPI, req/s; a CPU-bound server)": f"{miss['median']:.2f}{TIMES}",
        "the same miss, CPU per request (the app and its Redis) over the uncached request's": f"{miss_cpu:.2f}{TIMES}",
        "hit on a 3-master Cluster, a Sentinel-named master, TLS vs one Redis (req/s; every Redis on the app's core)":
            ", ".join(f"{ratio:.2f}{TIMES}" for ratio in topologies["cluster"]),
        "the same, every Redis on the other core (as Redis on other hosts)":
            ", ".join(f"{ratio:.2f}{TIMES}" for ratio in topologies["cluster-redis-elsewhere"]),
        "200 concurrent requests on one cold key: handler runs":
            str(peers["200 concurrent requests on one cold key: handler runs (cachemw)"]),
        "origin calls per cold key under overload, two servers (cachemw, fastapi-cache2, cashews)":
            ", ".join(cold.values()),
        f"staleness after a purge on another server, `sync` {staleness['args']['sync']:g} s: longest of "
        f"{sum(r['purges'] for r in purges):,} purges": f"{max(r['max_ms'] for r in purges):.1f} ms",
    }
    assert rows == expected
    assert all(r["answers_past_sync"] == 0 for r in purges)  # what "the bound" in the README promises


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and MkDocs' toc make it for these headings."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_resolves() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) > 20  # the quick start's links into the docs, the results files
    for link in local:
        path, _, fragment = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if fragment:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert fragment in {_slug(h) for h in headings}, link
