"""One-line diagnoses of the tests that fail in ``run.py``'s runs: (suite, mode, test id), as globs.

A test that saw an exception raised inside cachemw (the plugin records them) is diagnosed by it
first (RAISED_IN_CACHEMW: suite, mode, "Type: message" glob); else the first entry of DIAGNOSES
that matches. A diagnosis names the root cause (cachemw file:line and
the #14 item when it is one) or says why the harness, not cachemw, makes the test fail.
"""

DIAGNOSES: list[tuple[str, str, str, str]] = [
    # -- baseline: fails without cachemw ---------------------------------------------------------
    ("starlette", "*", "tests/test_staticfiles.py::test_staticfiles_with_invalid_dir_permissions_returns_401*",
     "run as root here: a file chmod 000 stays readable, so no PermissionError (fails without cachemw)"),
    # -- no policy (pass-through) -------------------------------------------------------------------
    ("starlette", "*", "tests/test_testclient.py::test_error_on_startup*",
     "#14 item 11: the lifespan's RuntimeError comes out as an ExceptionGroup: the app's lifespan runs inside "
     "the supervisor's task group (cachemw/middleware.py _lifespan `async with self.supervisor.run()`, "
     "cachemw/background.py Supervisor.run `anyio.create_task_group()`)"),
    ("starlette", "*", "tests/test_testclient.py::test_exception_in_middleware*",
     "#14 item 11: an exception a middleware inside the cache raises on the lifespan scope comes out as an "
     "ExceptionGroup (supervisor's task group around the app's lifespan, cachemw/middleware.py _lifespan)"),
    ("fastapi", "*", "tests/test_telemetry/test_runtime.py::test_application_lifespan_errors_still_propagate*",
     "#14 item 11: the app's RuntimeError in its lifespan startup/shutdown comes out as an ExceptionGroup "
     "(supervisor's task group around the app's lifespan, cachemw/middleware.py _lifespan)"),
    # -- catch-all rule --------------------------------------------------------------------------------
    ("starlette", "*-catchall*", "tests/test_testclient.py::test_streaming_response_is_available_before_first_chunk*",
     "new: on a cacheable route the response start is held until the first body chunk "
     "(cachemw/middleware.py:1016-1019 `_FillResponder.send` keeps it in `_held`, sent with the first body at "
     "1030-1036 to add an ETag); a stream whose first chunk waits shows the client no status/headers"),
    ("starlette", "*-catchall*", "tests/middleware/test_base.py::test_do_not_block_on_background_tasks*",
     "new (latency): two concurrent GET / run the handler once (single-flight, as declared), but the collapsed "
     "one is answered only after the first response's BackgroundTask finished: the flight finishes when the "
     "app call returns (cachemw/middleware.py `_miss`, `flight.finish` after `_forward`), which in Starlette "
     "includes the background task; repro `collapsed_wait_for_background_task`"),
    ("starlette", "*-catchall*", "tests/middleware/test_base.py::test_multiple_middlewares_stacked_client_disc*",
     "as declared: the test compares the exact response-start headers; a cached route adds `X-Cache`, "
     "`Cache-Status` and an `ETag`"),
    ("starlette", "*-catchall*", "tests/test_testclient.py::test_use_testclient_as_contextmanager*",
     "staleness as declared: two GET /loop_id outside `with client` expect 1 then 2 (a new loop per request); "
     "the second is the cached 1 within the 2 s ttl"),
    ("starlette", "wrap-catchall*", "tests/test_routing.py::test_lifespan_state_async_cm*",
     "staleness as declared: the second GET / is a hit within the 2 s ttl, so the handler appends to "
     "state.items once and the lifespan's check [1] == [1, 1] fails (the Router is cached only when wrapped)"),
    ("starlette", "wrap-*", "tests/test_routing.py::test_raise_on_startup*",
     "#14 item 11: a startup exception of the router's lifespan comes out as an ExceptionGroup (wrapped "
     "app; supervisor's task group, cachemw/middleware.py _lifespan)"),
    ("starlette", "wrap-*", "tests/test_routing.py::test_raise_on_shutdown*",
     "#14 item 11: a shutdown exception of the router's lifespan comes out as an ExceptionGroup (wrapped "
     "app; supervisor's task group, cachemw/middleware.py _lifespan)"),
    ("starlette", "wrap-*", "tests/test_routing.py::test_lifespan_state_unsupported*",
     "#14 item 11: Starlette's RuntimeError('The server does not support \"state\"') comes out as an "
     "ExceptionGroup (supervisor's task group, cachemw/middleware.py _lifespan)"),
]

RAISED_IN_CACHEMW: list[tuple[str, str, str, str]] = [
    ("*", "*", "TypeError: unhashable type: 'list'",
     "#14 item 6: TestClient's list `scope[\"server\"]` goes into the memo key of `KeyCache.key` "
     "(cachemw/keys.py:188-199), so every cached GET raises; the test sees the exception or a 500"),
    ("*", "*", "KeyError: 'headers'",
     "new (minor): an http scope without `headers` (the test's own hand-made scope) raises KeyError in "
     "`RequestHeaders.__init__` (cachemw/keys.py:35) on a cached route; the app alone never reads them"),
]
