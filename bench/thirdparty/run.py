"""Run FastAPI's and Starlette's own test suites with CacheMiddleware in every app they build.

For each suite: the baseline (no plugin), then each mode of ``cachemw_suites`` (beside this
file), and write ``bench/results/thirdparty.md``: counts per mode and every test that fails
with the plugin but not without, each with a one-line diagnosis (``diagnoses.py``).

The suites are those of the FastAPI and Starlette versions installed in ``--python``'s
environment, from their sdists (which ship ``tests/`` and ``docs_src/``); they are
downloaded into ``--src`` (default ``bench/thirdparty/src``, not in git) when missing.
That environment needs their test requirements (``requirements.txt`` beside this file)
and cachemw installed; keep it apart from the project's own venv::

    python3 -m venv /work/suites-venv
    /work/suites-venv/bin/pip install -e '.[test]' -r bench/thirdparty/requirements.txt
    python3 bench/thirdparty/run.py --python /work/suites-venv/bin/python
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from diagnoses import DIAGNOSES, FAILURE_MESSAGES, RAISED_IN_CACHEMW  # noqa: E402

MODES = {
    # name: (CACHEMW_SUITES_MODE, CACHEMW_SUITES_POLICY)
    "baseline": (None, None),
    "inject-none": ("inject", "none"),
    "wrap-none": ("wrap", "none"),
    "inject-catchall": ("inject", "catchall"),
    "wrap-catchall": ("wrap", "catchall"),
    # The same with a list scope["server"] made a tuple first (#14 item 6 worked around, diagnosis only).
    "inject-catchall-tuple": ("inject", "catchall"),
    "wrap-catchall-tuple": ("wrap", "catchall"),
}
DEFAULT_MODES = ("baseline", "inject-none", "wrap-none", "inject-catchall", "wrap-catchall")
SUITES = {
    # name: (distribution, extra pytest arguments)
    "fastapi": ("fastapi", []),  # its own config: timeout = 20 s a test
    "starlette": ("starlette", ["--timeout=60"]),  # anyio runs each async test on asyncio and trio
}
FAILED = ("failed", "error")


@dataclass
class Outcome:
    outcome: str  # passed, failed, error, skipped, xfailed
    message: str = ""


@dataclass
class Run:
    suite: str
    mode: str
    command: str
    seconds: float
    exit_code: int
    results: dict[str, Outcome]
    events: list[dict[str, object]] = field(default_factory=list)

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(result.outcome for result in self.results.values())


def installed_version(python: str, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def suite_source(python: str, src: Path, dist: str, version: str) -> Path:
    folder = src / f"{dist}-{version}"
    if (folder / "tests").is_dir():
        return folder
    src.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(src),
                    f"{dist}=={version}"], check=True)
    archive = src / f"{dist}-{version}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    if not (folder / "tests").is_dir():
        raise SystemExit(f"{archive} has no tests/ folder: this version's sdist does not ship its suite")
    return folder


def parse_junit(path: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    if not path.exists():
        return results
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        test_id = f"{classname.replace('.', '/')}::{case.get('name')}"
        outcome = Outcome("passed")
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed" if child.tag == "failure" else "error"
                outcome = Outcome(kind, (child.get("message") or child.text or "").strip().splitlines()[0][:240]
                                  if (child.get("message") or child.text) else "")
                break
            if child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                outcome = Outcome(kind, (child.get("message") or "")[:240])
        # A test that passed and errored in teardown shows up twice: the worst wins.
        previous = results.get(test_id)
        if previous is None or outcome.outcome in FAILED:
            results[test_id] = outcome
    return results


def plan(python: str, suite: str, folder: Path, mode: str, out: Path, workers: int
         ) -> tuple[list[str], dict[str, str], str]:
    """The pytest command of one run, its environment, and the command as the report shows it."""
    plugin_mode, policy = MODES[mode]
    junit = out / f"{suite}-{mode}.xml"
    args = [python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *SUITES[suite][1]]
    if workers > 1:
        # A test that hangs past its timeout ends its worker (thread method), xdist reports it as failed
        # and starts another: one hang (a test whose cleanup never runs once an assertion failed) cannot
        # stall the run. The signal method cannot end a test stuck joining the loop's executor threads.
        args += ["-n", str(workers), "--timeout-method=thread", "--max-worker-restart=1000"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEMW_", "PYTEST_"))}
    if plugin_mode is not None:
        args += ["-p", "cachemw_suites"]
        env.update(CACHEMW_SUITES_MODE=plugin_mode, CACHEMW_SUITES_POLICY=policy or "none",
                   CACHEMW_SUITES_EVENTS=str(out / f"{suite}-{mode}.events.jsonl"),
                   CACHEMW_SUITES_SERVER_TUPLE="1" if mode.endswith("-tuple") else "0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])))
    shown = " ".join(f"{k}={env[k]}" for k in ("CACHEMW_SUITES_MODE", "CACHEMW_SUITES_POLICY",
                                                 "CACHEMW_SUITES_SERVER_TUPLE") if env.get(k) not in (None, "0"))
    command = f"cd {folder.name} && {shown + ' ' if shown else ''}" + " ".join(
        shlex.quote(a) for a in [Path(python).name, *args[1:]] if not a.startswith("--junitxml"))
    return args, env, command


def run_one(python: str, suite: str, folder: Path, mode: str, out: Path, workers: int) -> Run:
    args, env, command = plan(python, suite, folder, mode, out, workers)
    for stale in (f"{suite}-{mode}.xml", f"{suite}-{mode}.log", f"{suite}-{mode}.events.jsonl",
                  f"{suite}-{mode}.json"):
        (out / stale).unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {suite} {mode}: {command}", flush=True)
    started = time.monotonic()
    with (out / f"{suite}-{mode}.log").open("w") as fh:
        proc = subprocess.run(args, cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    (out / f"{suite}-{mode}.json").write_text(json.dumps({"seconds": seconds, "exit_code": proc.returncode}))
    run = load_run(suite, mode, command, out)
    print(f"    {seconds:.0f}s exit {proc.returncode}: " + ", ".join(f"{n} {k}" for k, n in
                                                                   sorted(run.counts().items())), flush=True)
    return run


def load_run(suite: str, mode: str, command: str, out: Path) -> Run:
    """One run's results from its files in ``out`` (what --report-only reads)."""
    junit = out / f"{suite}-{mode}.xml"
    meta_file = out / f"{suite}-{mode}.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    seconds = meta.get("seconds")
    if seconds is None and junit.exists():  # a run from before the .json: pytest's own figure
        suite_node = ET.parse(junit).getroot()
        suite_node = suite_node if suite_node.tag == "testsuite" else suite_node.find("testsuite")
        seconds = float(suite_node.get("time", 0)) if suite_node is not None else 0.0
    run = Run(suite, mode, command, seconds or 0.0, meta.get("exit_code", -1), parse_junit(junit))
    events = out / f"{suite}-{mode}.events.jsonl"
    if events.exists():
        with events.open() as fh:
            run.events = [json.loads(line) for line in fh if line.strip()]
    return run


def diagnose(suite: str, mode: str, test_id: str, raised_in_cachemw: list[str] = (), message: str = "") -> str | None:
    """For an exception the test saw raised inside cachemw, its diagnosis; else the first whose globs match."""
    for message in raised_in_cachemw:  # a crash in cachemw comes first: it hides whatever else the test checks
        for suites, modes, pattern, text in RAISED_IN_CACHEMW:
            if fnmatch.fnmatchcase(suite, suites) and fnmatch.fnmatchcase(mode, modes) and \
                    fnmatch.fnmatchcase(message, pattern):
                return text + f" (seen: `{message[:100]}`)"
    for suites, modes, pattern, text in DIAGNOSES:
        # junit names a test by module ("tests/test_x::name"); a diagnosis may write the file name.
        if fnmatch.fnmatchcase(suite, suites) and fnmatch.fnmatchcase(mode, modes) and \
                fnmatch.fnmatchcase(test_id, pattern.replace(".py::", "::")):
            return text
    for suites, modes, pattern, text in FAILURE_MESSAGES:  # last: by what the test's failure says
        if fnmatch.fnmatchcase(suite, suites) and fnmatch.fnmatchcase(mode, modes) and \
                fnmatch.fnmatchcase(message, pattern):
            return text
    return None


def raised_in_cachemw(run: Run) -> dict[str, list[str]]:
    """Per test (as junit names it), the exceptions whose innermost frame was in cachemw."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for event in run.events:
        if event["kind"] == "exception" and event["origin"] == "cachemw":
            test = str(event["test"]).replace(".py::", "::")
            found[test].append(f"{event['type']}: {event['message']}")
    return found


def event_summary(run: Run) -> list[str]:
    lines: list[str] = []
    exceptions = collections.Counter()
    from_cachemw: dict[str, set[str]] = collections.defaultdict(set)
    logs = collections.Counter()
    across = collections.defaultdict(set)
    across_detail: list[tuple[str, str, list[str]]] = []
    x_cache: collections.Counter[str] = collections.Counter()
    no_routes = 0
    for event in run.events:
        kind = event["kind"]
        if kind == "exception":
            label = f"{event['type']} (innermost frame in {event['origin']})"
            exceptions[label] += 1
            if event["origin"] == "cachemw":
                from_cachemw[f"{event['type']}: {event['message']}"[:160]].add(str(event["test"]))
        elif kind == "log":
            logs[f"{event['level']} {event['logger']}: {str(event['message'])[:120]}"] += 1
        elif kind == "hit-across-requests":
            across[f"{event['method']} {event['path']}"].add(str(event["test"]))
            fill, hit = dict(map(tuple, event["fill"]["headers"])), dict(map(tuple, event["hit"]["headers"]))
            names = sorted(n for n in set(fill) | set(hit) if fill.get(n) != hit.get(n))
            across_detail.append((str(event["test"]), f"{event['method']} {event['path']}", names))
        elif kind == "x-cache":
            x_cache.update(event["counts"])  # type: ignore[arg-type]
        elif kind == "no-routes":
            no_routes += 1
    if x_cache:
        lines.append("- responses by `X-Cache`: " + ", ".join(f"{k} {n}" for k, n in x_cache.most_common()))
    if no_routes:
        lines.append(f"- apps the catch-all rule matched no route of (run with no policy): {no_routes}")
    if exceptions:
        lines.append("- exceptions out of the middleware: " + ", ".join(f"{k}: {n}" for k, n in
                                                                          exceptions.most_common()))
    for message, tests in sorted(from_cachemw.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  - raised in cachemw, {len(tests)} test(s): `{message}`")
    if logs:
        lines.append("- cachemw log records (WARNING+): " + "; ".join(f"`{k}` x{n}" for k, n in logs.most_common(8)))
    if across:
        tests = set().union(*across.values())
        lines.append(f"- hits served to a request that differs from the fill's in a header beyond the usual ones "
                     f"(possible cross-user): {len(across_detail)} in {len(tests)} test(s):")
        for test, what, names in across_detail[:30]:
            lines.append(f"  - `{test}`: {what}, headers differing: {', '.join(names) or '(order only)'}")
    else:
        lines.append("- no hit was served to a request that differs from the fill's in any header beyond the usual "
                     "ones (no response across users)")
    return lines


def ran_at(runs: list[Run], raw: Path) -> str:
    stamps = [(raw / f"{run.suite}-{run.mode}.xml").stat().st_mtime for run in runs
              if (raw / f"{run.suite}-{run.mode}.xml").exists()]
    if not stamps:
        return "(no results)"
    fmt = "%Y-%m-%d %H:%M UTC"
    first, last = (datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(fmt)
                   for t in (min(stamps), max(stamps)))
    return first if first == last else f"between {first} and {last}"


def write_report(path: Path, runs: list[Run], versions: dict[str, str], python: str, argv: list[str],
                 raw: Path) -> None:
    code = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M",
                           "--", "cachemw"], capture_output=True, text=True).stdout.strip()
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "cachemw"], capture_output=True,
                           text=True).stdout.strip()
    pyver = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                           text=True).stdout.strip()
    others = {d: installed_version(python, d) for d in ("anyio", "trio", "httpx", "pydantic", "pytest")}
    out: list[str] = [
        "# Third-party test suites with CacheMiddleware in every app",
        "",
        f"- command: `python3 {' '.join(shlex.quote(a) for a in argv if a != '--report-only')}` (from the "
        "repository root)" + ("; this report was rewritten from its files with `--report-only`"
                              if "--report-only" in argv else ""),
        f"- date: the runs ended {ran_at(runs, raw)}",
        f"- revision: branch at {revision}; cachemw/ as of {code} (its last commit)"
        f"{', with uncommitted changes in cachemw/' if dirty else ''}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {pyver}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in {**versions, **others}.items()),
        "- plugin: `bench/thirdparty/cachemw_suites.py` (`-p cachemw_suites`, no edit to the suites). "
        "`inject`: `CacheMiddleware` is the outermost user middleware of every Starlette/FastAPI app, as "
        "`app.add_middleware(CacheMiddleware)` called last; `wrap`: every app a `TestClient` or httpx "
        "`ASGITransport` runs is `CacheMiddleware(app)`. `none`: `CacheMiddleware()` defaults, no policy, "
        "memory store; `catchall`: one rule `route = \"/*\"`, `ttl = \"2s\"`, shared, memory store; "
        "`-tuple`: the same with `CACHEMW_SUITES_SERVER_TUPLE=1`, a list `scope[\"server\"]` made a tuple "
        "before cachemw sees it (#14 item 6 worked around, to see what fails beyond it).",
        "",
        "## Counts",
        "",
        "| suite | mode | passed | failed | errors | skipped | xfailed | beyond baseline | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = {run.suite: run for run in runs if run.mode == "baseline"}
    extra: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        base = baselines.get(run.suite)
        if base is not None and run is not base:
            extra[(run.suite, run.mode)] = sorted(
                t for t, r in run.results.items()
                if r.outcome in FAILED and (t not in base.results or base.results[t].outcome not in FAILED))
        c = run.counts()
        beyond = "" if run.mode == "baseline" else str(len(extra.get((run.suite, run.mode), [])))
        out.append(f"| {run.suite} | {run.mode} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | "
                   f"{c['xfailed']} | {beyond} | {run.seconds:.0f} |")
    out.append("")
    for run in runs:
        out += [f"## {run.suite}, {run.mode}", "", f"`{run.command}`", ""]
        if run.mode == "baseline":
            failing = sorted(t for t, r in run.results.items() if r.outcome in FAILED)
            out.append(f"Fails without the middleware ({len(failing)}):")
            out += [f"- `{t}`: {diagnose(run.suite, 'baseline', t) or run.results[t].message}" for t in failing]
            out.append("")
            continue
        out += event_summary(run)
        tests = extra.get((run.suite, run.mode), [])
        out += ["", f"Fail with the plugin but not without ({len(tests)}):" if tests else
                "No test fails with the plugin that passes without it.", ""]
        undiagnosed = 0
        raised = raised_in_cachemw(run)
        by_cause: dict[str, list[str]] = collections.defaultdict(list)
        for test_id in tests:
            text = diagnose(run.suite, run.mode, test_id, raised.get(test_id, []), run.results[test_id].message)
            if text is None:
                undiagnosed += 1
                text = "undiagnosed: " + run.results[test_id].message
            elif "(seen: `" in text:
                text = text[:text.index(" (seen: `")]  # one group per cause, not per message
            by_cause[text].append(test_id)
        for text, ids in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
            out.append(f"- {len(ids)} test(s): {text}")
            shown = ids if len(ids) <= 12 else [*ids[:10], f"... and {len(ids) - 10} more (see the junit XML)"]
            out += [f"  - `{t}`" if not t.startswith("...") else f"  - {t}" for t in shown]
        if undiagnosed:
            out.append(f"\n{undiagnosed} of these have no diagnosis yet.")
        out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the suites' venv")
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, of {list(SUITES)}")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--src", type=Path, default=HERE / "src", help="where the suites' sdists are unpacked")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "thirdparty.md")
    parser.add_argument("--raw", type=Path, default=HERE / "out", help="junit XML, logs and plugin events")
    parser.add_argument("-n", "--workers", type=int, default=2,
                        help="pytest-xdist workers per run (1: no xdist, and a hung test stalls the run)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the files a previous run left in --raw")
    args = parser.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for name in suites:
        if name not in SUITES:
            parser.error(f"unknown suite {name!r}")
    for name in modes:
        if name not in MODES:
            parser.error(f"unknown mode {name!r}")
    if "baseline" not in modes:
        modes.insert(0, "baseline")
    args.raw.mkdir(parents=True, exist_ok=True)
    versions = {dist: installed_version(args.python, dist) for dist, _ in SUITES.values()}
    runs: list[Run] = []
    for suite in suites:
        dist = SUITES[suite][0]
        folder = suite_source(args.python, args.src, dist, versions[dist])
        for mode in modes:
            if args.report_only:
                runs.append(load_run(suite, mode, plan(args.python, suite, folder, mode, args.raw, args.workers)[2],
                                     args.raw))
            else:
                runs.append(run_one(args.python, suite, folder, mode, args.raw, args.workers))
    write_report(args.out, runs, versions, args.python, ["bench/thirdparty/run.py", *argv], args.raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
