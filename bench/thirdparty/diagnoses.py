"""One-line diagnoses of the tests that fail in ``run.py``'s runs: (suite, mode, test id), as globs.

The first entry that matches wins. A diagnosis names the root cause (cachemw file:line and
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
