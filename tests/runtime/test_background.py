"""The supervisor: bounded, isolated, drained background work.

Jobs block on ``anyio.Event``s the test releases; waits are bounded by ``until``.
Nothing here sleeps and hopes.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable

import anyio
import pytest
from anyio.abc import TaskStatus

from cachemw.runtime.supervisor import JOB_BYTES, JobCounters, Supervisor, current_supervisor, detach
from tests.helpers import eventually

LOGGER = "cachemw.runtime.supervisor"


async def until(predicate: Callable[[], bool], what: str = "condition", within: float = 5.0) -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, what=what, within=within)


class Gate:
    """Jobs that wait for the test to let them finish; it records who ran and how many at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.started: list[object] = []
        self.finished: list[object] = []
        self.cancelled: list[object] = []
        self.active = 0
        self.peak = 0

    async def job(self, name: object = None) -> None:
        self.started.append(name)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.release.wait()
        except BaseException:
            self.cancelled.append(name)
            raise
        finally:
            self.active -= 1
        self.finished.append(name)


def snapshot(counters: JobCounters) -> dict[str, int]:
    return {name: getattr(counters, name) for name in ("queued", "running", "done", "failed", "shed", "abandoned")}


# -- submitting ------------------------------------------------------------------------------


def test_queue_size_and_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor(queue_size=0)
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor(concurrency=0)


@pytest.mark.anyio
async def test_submit_returns_at_once_and_the_job_runs_after() -> None:
    supervisor = Supervisor()
    gate = Gate()
    async with supervisor.run():
        assert supervisor.running
        assert supervisor.submit("fill", gate.job, "a", key="k") is True
        assert gate.finished == []  # submit did not wait for the job
        await until(lambda: gate.started == ["a"], "job started")
        assert supervisor.counters["fill"].running == 1
        gate.release.set()
        await until(lambda: supervisor.counters["fill"].done == 1, "job done")
        assert gate.finished == ["a"]
        assert snapshot(supervisor.counters["fill"]) == {
            "queued": 0, "running": 0, "done": 1, "failed": 0, "shed": 0, "abandoned": 0}


@pytest.mark.anyio
async def test_concurrency_bounds_the_jobs_running_at_once() -> None:
    supervisor = Supervisor(queue_size=10, concurrency=2)
    gate = Gate()
    async with supervisor.run():
        for i in range(5):
            assert supervisor.submit("fill", gate.job, i)
        counters = supervisor.counters["fill"]
        await until(lambda: counters.running == 2, "two jobs running")
        assert counters.queued == 3
        assert len(gate.started) == 2
        gate.release.set()
        await until(lambda: counters.done == 5, "all jobs done")
    assert gate.peak == 2
    assert set(gate.finished) == {0, 1, 2, 3, 4}


@pytest.mark.anyio
async def test_full_queue_sheds_and_counts_without_blocking() -> None:
    supervisor = Supervisor(queue_size=2, concurrency=1)
    gate = Gate()
    async with supervisor.run():
        counters = supervisor.counters_for("fill")
        assert supervisor.submit("fill", gate.job, 0)
        await until(lambda: counters.running == 1, "first job running")
        # The worker is busy: two jobs fit the queue, the rest are shed on the spot.
        assert [supervisor.submit("fill", gate.job, i) for i in range(1, 6)] == [True, True, False, False, False]
        assert counters.shed == 3
        assert counters.queued == 2
        gate.release.set()
        await until(lambda: counters.done == 3, "accepted jobs done")
    assert gate.finished == [0, 1, 2]
    assert snapshot(counters) == {"queued": 0, "running": 0, "done": 3, "failed": 0, "shed": 3, "abandoned": 0}


@pytest.mark.anyio
async def test_fills_past_the_queued_bytes_are_shed_and_a_small_job_still_queues() -> None:
    """A fill holds its entry until done: the queue bounds those bytes, not only the number of jobs."""
    supervisor = Supervisor(queue_size=100, concurrency=1, queue_max_bytes=10 * JOB_BYTES + 3 * 10_000)
    gate = Gate()
    async with supervisor.run():
        fills = supervisor.counters_for("fill")
        assert supervisor.submit("fill", gate.job, 0, size=10_000)
        await until(lambda: fills.running == 1, "first fill running")
        # Running or queued, three 10 kB fills fit; the rest are shed though the queue has room for 100 jobs.
        assert [supervisor.submit("fill", gate.job, i, size=10_000) for i in range(1, 5)] == [True, True, False,
                                                                                           False]
        assert fills.shed == 2 and supervisor.queued_bytes <= supervisor.queue_max_bytes
        assert supervisor.submit("unlock", gate.job, "release")  # holds no entry: JOB_BYTES fit
        gate.release.set()
        await until(lambda: fills.done == 3, "accepted fills done")
        await until(lambda: supervisor.queued_bytes == 0, "their bytes given back")
        assert supervisor.submit("fill", gate.job, 5, size=10_000)
    assert gate.finished == [0, 1, 2, "release", 5]


@pytest.mark.anyio
async def test_counters_are_per_kind() -> None:
    supervisor = Supervisor(queue_size=1, concurrency=1)
    gate = Gate()
    async with supervisor.run():
        assert supervisor.submit("fill", gate.job)
        await until(lambda: supervisor.counters["fill"].running == 1)
        assert supervisor.submit("refresh", gate.job)
        assert not supervisor.submit("log", gate.job)
        assert supervisor.counters["fill"].running == 1 and supervisor.counters["fill"].shed == 0
        assert supervisor.counters["refresh"].queued == 1
        assert supervisor.counters["log"].shed == 1
        gate.release.set()


# -- failures --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_failing_job_is_counted_logged_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(concurrency=1)
    gate = Gate()

    async def boom() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with supervisor.run():
            assert supervisor.submit("other", gate.job, "alongside")
            await until(lambda: gate.started == ["alongside"])
            assert supervisor.submit("fill", boom, key="products:1")
            assert supervisor.submit("fill", gate.job, "after")
            gate.release.set()
            await until(lambda: supervisor.counters["fill"].failed == 1 and supervisor.counters["fill"].done == 1)
            assert supervisor.running
            # The same (only) worker survived: later jobs still run.
            assert supervisor.submit("fill", gate.job, "later")
            await until(lambda: supervisor.counters["fill"].done == 2)
    assert gate.finished == ["alongside", "after", "later"]
    assert supervisor.counters["other"].done == 1
    failures = [r for r in caplog.records if r.name == LOGGER and "failed" in r.getMessage()]
    assert len(failures) == 1
    message = failures[0].getMessage()
    assert "fill" in message and "products:1" in message and "boom" in message
    assert failures[0].levelno == logging.WARNING
    assert failures[0].exc_info is not None  # the traceback is kept


@pytest.mark.anyio
async def test_job_exceeding_its_timeout_is_cancelled_and_failed(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(job_timeout=60)
    gate = Gate()  # never released
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with supervisor.run():
            assert supervisor.submit("fill", gate.job, "slow", key="k", timeout=0.05)
            await until(lambda: supervisor.counters["fill"].failed == 1, "timed-out job failed")
            assert gate.cancelled == ["slow"]
            assert supervisor.counters["fill"].done == 0
            assert supervisor.running
    assert any("fill" in r.getMessage() and "k" in r.getMessage() for r in caplog.records if r.name == LOGGER)


@pytest.mark.anyio
async def test_supervisor_job_timeout_is_the_default() -> None:
    supervisor = Supervisor(job_timeout=0.05)
    gate = Gate()
    async with supervisor.run():
        assert supervisor.submit("fill", gate.job, "slow")
        await until(lambda: supervisor.counters["fill"].failed == 1, "timed-out job failed")
    assert gate.cancelled == ["slow"]


@pytest.mark.anyio
async def test_retried_job_that_succeeds_counts_once_as_done(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(retry_backoff=0.001)
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(len(attempts))
        if len(attempts) <= 2:
            raise ConnectionError("transient")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with supervisor.run():
            assert supervisor.submit("flush", flaky, retries=2)
            await until(lambda: supervisor.counters["flush"].done == 1, "retried job done")
    assert attempts == [0, 1, 2]
    assert snapshot(supervisor.counters["flush"])["failed"] == 0
    assert not [r for r in caplog.records if r.name == LOGGER and "failed" in r.getMessage()]


@pytest.mark.anyio
async def test_job_failing_every_retry_is_failed_once() -> None:
    supervisor = Supervisor(retry_backoff=0.001)
    attempts: list[int] = []

    async def broken() -> None:
        attempts.append(1)
        raise ConnectionError("down")

    async with supervisor.run():
        assert supervisor.submit("flush", broken, retries=2)
        await until(lambda: supervisor.counters["flush"].failed == 1, "job failed")
    assert len(attempts) == 3
    assert supervisor.counters["flush"].done == 0


# -- shutdown --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shutdown_drains_queued_jobs_within_the_grace_period() -> None:
    supervisor = Supervisor(concurrency=1, grace_period=30)
    gate = Gate()

    async def release_once_draining() -> None:
        await until(lambda: not supervisor.running, "draining")
        gate.release.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with supervisor.run():
                for i in range(3):
                    assert supervisor.submit("flush", gate.job, i)
                await until(lambda: gate.started == [0])
                tg.start_soon(release_once_draining)
            # run() returned: everything queued at shutdown has finished.
            assert gate.finished == [0, 1, 2]
    counters = supervisor.counters["flush"]
    assert snapshot(counters) == {"queued": 0, "running": 0, "done": 3, "failed": 0, "shed": 0, "abandoned": 0}


@pytest.mark.anyio
async def test_shutdown_past_grace_abandons_counts_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(concurrency=1, grace_period=0.2)
    gate = Gate()  # never released
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with anyio.fail_after(5):  # run() exits in bounded time despite the stuck job
            async with supervisor.run():
                for i in range(3):
                    assert supervisor.submit("flush", gate.job, i)
                await until(lambda: gate.started == [0])
    assert gate.cancelled == [0]  # the stuck job was cancelled, not left running
    assert gate.started == [0]  # the queued ones never started
    counters = supervisor.counters["flush"]
    assert counters.abandoned == 3
    assert counters.queued == 0 and counters.running == 0  # nothing is left pretending to wait
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "abandoned 3" in warnings[0].getMessage()


@pytest.mark.anyio
async def test_submit_after_drain_starts_is_refused() -> None:
    supervisor = Supervisor(grace_period=30)
    gate = Gate()
    late = Gate()
    late.release.set()
    async with supervisor.run():
        assert supervisor.submit("fill", gate.job, "early")
        await until(lambda: gate.started == ["early"])
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.drain)
            await until(lambda: not supervisor.running, "draining")
            assert supervisor.submit("fill", late.job, "late") is False
            gate.release.set()
        assert supervisor.submit("fill", late.job, "later") is False
    assert gate.finished == ["early"]
    assert late.started == []
    assert supervisor.submit("fill", late.job, "after exit") is False


@pytest.mark.anyio
async def test_supervisor_can_run_again_after_shutdown() -> None:
    supervisor = Supervisor(concurrency=1, grace_period=0.05)
    stuck = Gate()
    async with supervisor.run():
        assert supervisor.submit("fill", stuck.job, 0)
        assert supervisor.submit("fill", stuck.job, 1)
        await until(lambda: stuck.started == [0])
    assert supervisor.counters["fill"].abandoned == 2

    gate = Gate()
    gate.release.set()
    async with supervisor.run():
        assert supervisor.running
        assert supervisor.submit("fill", gate.job, "again")
        await until(lambda: supervisor.counters["fill"].done == 1)
    assert snapshot(supervisor.counters["fill"]) == {
        "queued": 0, "running": 0, "done": 1, "failed": 0, "shed": 0, "abandoned": 2}


@pytest.mark.anyio
async def test_running_twice_at_once_is_refused() -> None:
    supervisor = Supervisor()
    async with supervisor.run():
        with pytest.raises(RuntimeError, match="already running"):
            async with supervisor.run():
                pass  # pragma: no cover
        assert supervisor.running


# -- services --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_service_runs_for_the_lifetime_and_is_cancelled_at_exit() -> None:
    supervisor = Supervisor(grace_period=30)
    events: list[str] = []

    async def listener(*, task_status: TaskStatus[None]) -> None:
        events.append("started")
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            events.append("cancelled")

    supervisor.add_service("listener", listener)
    gate = Gate()

    async def release_once_draining() -> None:
        await until(lambda: not supervisor.running, "draining")
        # Still alive while the queue drains: jobs may rely on it.
        assert events == ["started"]
        gate.release.set()

    async with anyio.create_task_group() as tg:
        async with supervisor.run():
            assert events == ["started"]  # started before run() handed over
            assert supervisor.submit("fill", gate.job)
            await until(lambda: gate.started == [None])
            tg.start_soon(release_once_draining)
        assert events == ["started", "cancelled"]
    assert gate.finished == [None]
    assert supervisor.service_restarts == {}


@pytest.mark.anyio
async def test_failing_service_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(retry_backoff=0.001)
    attempts: list[int] = []
    steady = anyio.Event()

    async def subscriber(*, task_status: TaskStatus[None]) -> None:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise ConnectionError("refused before start")
        task_status.started()  # reported again on each restart: must not raise
        if len(attempts) == 2:
            raise ConnectionError("dropped after start")
        steady.set()
        await anyio.sleep_forever()

    supervisor.add_service("subscriber", subscriber)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with anyio.fail_after(5):
            async with supervisor.run():
                await steady.wait()
                assert supervisor.service_restarts == {"subscriber": 2}
                assert supervisor.running
    assert attempts == [0, 1, 2]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("subscriber" in m and "restarting" in m for m in messages) == 2


@pytest.mark.anyio
async def test_service_failing_before_started_does_not_block_startup() -> None:
    supervisor = Supervisor(retry_backoff=0.001)

    async def never_starts(*, task_status: TaskStatus[None]) -> None:
        raise ConnectionError("no broker")

    supervisor.add_service("broker", never_starts)
    gate = Gate()
    gate.release.set()
    with anyio.fail_after(5):
        async with supervisor.run():
            assert supervisor.running
            assert supervisor.submit("fill", gate.job)
            await until(lambda: supervisor.counters["fill"].done == 1)
            await until(lambda: supervisor.service_restarts.get("broker", 0) >= 3, "restarts grow")


@pytest.mark.anyio
async def test_service_added_again_replaces_the_earlier_one() -> None:
    supervisor = Supervisor()
    ran: list[str] = []

    def service(name: str) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: TaskStatus[None]) -> None:
            ran.append(name)
            task_status.started()

        return run

    supervisor.add_service("log", service("first"))
    supervisor.add_service("log", service("second"))
    async with supervisor.run():
        pass
    assert ran == ["second"]


# -- detach() --------------------------------------------------------------------------------


def test_detach_outside_a_bound_supervisor_explains_itself() -> None:
    async def job() -> None:  # pragma: no cover - never runs
        pass

    # A fresh context: nothing bound, whatever earlier tests did in this thread.
    with pytest.raises(RuntimeError, match="HINT"):
        contextvars.Context().run(detach, job)
    with pytest.raises(RuntimeError, match="HINT"):
        contextvars.Context().run(current_supervisor)


@pytest.mark.anyio
async def test_detach_reaches_the_bound_supervisor() -> None:
    supervisor = Supervisor()
    gate = Gate()
    gate.release.set()
    results: list[bool] = []

    async def handler() -> None:  # a request's task: bound there, not in the test's context
        supervisor.bind()
        assert current_supervisor() is supervisor
        results.append(detach(gate.job, "receipt", kind="email"))

    async with supervisor.run():
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler)
        await until(lambda: supervisor.counters["email"].done == 1, "detached job done")
    assert results == [True]
    assert gate.finished == ["receipt"]


@pytest.mark.anyio
async def test_supervisor_detach_defaults_to_the_task_kind() -> None:
    supervisor = Supervisor()
    gate = Gate()
    gate.release.set()
    async with supervisor.run():
        assert supervisor.detach(gate.job, 1)
        await until(lambda: supervisor.counters["task"].done == 1)


# -- without a lifespan ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_without_run_jobs_are_refused_outside_an_inline_block() -> None:
    supervisor = Supervisor()
    gate = Gate()
    assert not supervisor.running
    assert supervisor.submit("fill", gate.job) is False
    assert gate.started == []


@pytest.mark.anyio
async def test_inline_jobs_run_at_the_end_of_the_block_in_order(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor()
    ran: list[int] = []

    async def job(n: int) -> None:
        ran.append(n)

    async def boom() -> None:
        raise ValueError("inline boom")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with supervisor.inline_after_response():
            assert supervisor.submit("fill", job, 1)
            assert supervisor.submit("fill", boom, key="k")
            assert supervisor.submit("log", job, 2)
            assert supervisor.submit("fill", job, 3)
            assert ran == []  # nothing runs before the response is done
            assert supervisor.counters["fill"].queued == 3
    assert ran == [1, 2, 3]
    assert snapshot(supervisor.counters["fill"]) == {
        "queued": 0, "running": 0, "done": 2, "failed": 1, "shed": 0, "abandoned": 0}
    assert supervisor.counters["log"].done == 1
    assert any("inline boom" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    # The block is over: jobs are refused again.
    assert supervisor.submit("fill", job, 4) is False


@pytest.mark.anyio
async def test_inline_jobs_belong_to_their_own_request() -> None:
    """Two requests served at once without a lifespan: each runs its own jobs at its own end."""
    supervisor = Supervisor()
    ran: list[str] = []
    a_inside, b_inside, a_submitted, b_done = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
    seen_when_b_done: list[str] = []
    accepted: dict[str, bool] = {}

    async def job(name: str) -> None:
        ran.append(name)

    async def request_a() -> None:
        async with supervisor.inline_after_response():
            a_inside.set()
            await b_inside.wait()
            accepted["a"] = supervisor.submit("log", job, "a")
            a_submitted.set()
            await b_done.wait()
            seen_when_b_done.extend(ran)

    async def request_b() -> None:
        await a_inside.wait()
        async with supervisor.inline_after_response():
            b_inside.set()
            await a_submitted.wait()
            accepted["b"] = supervisor.submit("log", job, "b")
        b_done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(request_a)
            tg.start_soon(request_b)
    assert accepted == {"a": True, "b": True}
    assert seen_when_b_done == ["b"]  # a's job waits for a's own response
    assert ran == ["b", "a"]


@pytest.mark.anyio
async def test_inline_block_while_running_leaves_jobs_to_the_workers() -> None:
    supervisor = Supervisor()
    gate = Gate()
    async with supervisor.run():
        async with supervisor.inline_after_response():
            assert supervisor.submit("fill", gate.job, 1)
        # The block did not wait for the job: the workers own it.
        await until(lambda: gate.started == [1])
        assert gate.finished == []
        gate.release.set()
        await until(lambda: supervisor.counters["fill"].done == 1)


# -- counters --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_counters_are_readable_before_during_and_after() -> None:
    supervisor = Supervisor(concurrency=1)
    assert supervisor.counters == {}
    assert snapshot(supervisor.counters_for("fill")) == {
        "queued": 0, "running": 0, "done": 0, "failed": 0, "shed": 0, "abandoned": 0}
    gate = Gate()
    async with supervisor.run():
        supervisor.submit("fill", gate.job, 1)
        supervisor.submit("fill", gate.job, 2)
        await until(lambda: supervisor.counters["fill"].running == 1)
        assert snapshot(supervisor.counters["fill"])["queued"] == 1
        gate.release.set()
    assert snapshot(supervisor.counters["fill"]) == {
        "queued": 0, "running": 0, "done": 2, "failed": 0, "shed": 0, "abandoned": 0}


@pytest.mark.anyio
async def test_a_lane_of_slow_jobs_never_holds_up_the_other_work() -> None:
    supervisor = Supervisor(concurrency=2, lanes={"refresh": 2})
    gate = anyio.Event()
    done = anyio.Event()

    async def slow_refresh() -> None:
        await gate.wait()

    async def fill() -> None:
        done.set()

    async with supervisor.run():
        for _ in range(5):
            assert supervisor.submit("refresh", slow_refresh)
        assert supervisor.submit("fill", fill)
        with anyio.fail_after(5):
            await done.wait()  # the refresh lane is full and blocked; the fill ran anyway
        assert supervisor.counters_for("refresh").running == 2
        gate.set()


@pytest.mark.anyio
async def test_a_service_back_off_starts_over_after_a_healthy_run() -> None:
    """#14 item 4: the restart delay doubled and never went back (up to 30 s), so a listener
    that had run well for hours waited as long as one failing in a loop."""
    supervisor = Supervisor(retry_backoff=0.02, healthy_run=0.3)
    starts: list[float] = []

    async def flaky(*, task_status: TaskStatus[None]) -> None:
        starts.append(anyio.current_time())
        task_status.started()
        if len(starts) == 6:
            await anyio.sleep(0.4)  # a healthy run (longer than healthy_run), then it fails again
        if len(starts) <= 6:
            raise ConnectionError("lost")
        await anyio.sleep_forever()

    supervisor.add_service("flaky", flaky)
    with anyio.fail_after(10):
        async with supervisor.run():
            await until(lambda: len(starts) == 7, "seven runs", within=8)
    streak = [starts[i + 1] - starts[i] for i in range(5)]
    assert streak[-1] >= 0.16  # 0.02, 0.04, 0.08, 0.16, 0.32: doubling while it keeps failing
    after_healthy = starts[6] - starts[5] - 0.4
    assert after_healthy < 0.3, f"restarted {after_healthy:.2f}s after a healthy run (0.64 before the reset)"
