"""One-line diagnoses of the tests that fail in ``run.py``'s runs: (suite, mode, test id), as globs.

The first entry that matches wins. A diagnosis names the root cause (cachemw file:line and
the #14 item when it is one) or says why the harness, not cachemw, makes the test fail.
"""

DIAGNOSES: list[tuple[str, str, str, str]] = [
    # -- baseline: fails without cachemw ---------------------------------------------------------
    ("starlette", "*", "tests/test_staticfiles.py::test_staticfiles_with_invalid_dir_permissions_returns_401*",
     "run as root here: a file chmod 000 stays readable, so no PermissionError (fails without cachemw)"),
]
