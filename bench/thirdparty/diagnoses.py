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
    ("fastapi", "*-catchall*", "tests/test_security_api_key_*",
     "RESPONSE ACROSS USERS, #14 item 8 not done: the 200 filled with the API key "
     "(APIKeyHeader/APIKeyCookie `key`) is replayed to the request without it; `_credential_names` "
     "(cachemw/middleware.py:1056) reads `rule.credentials`, which cachemw/rules.py never sets; repro "
     "`fastapi_api_key_replayed`"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_bigger_applications/*token*",
     "RESPONSE ACROSS USERS (#14 item 8, X-Token style): the answer filled with the right `X-Token` is "
     "replayed to a wrong or missing one; a plain `Header()` checked by a dependency is a credential only "
     "if the `credentials` setting names it (the harness rule names none)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_testing/test_main_b.py::*",
     "RESPONSE ACROSS USERS (#14 item 8, X-Token style): GET /items/foo with a bad `X-Token` gets the 200 "
     "filled with the good one; `X-Token` is a plain `Header()`, a credential only if the `credentials` "
     "setting names it"),
    ("fastapi", "*-catchall*", "tests/test_header_cookie_alias_choices.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_header_cookie_optional_models.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_request_params/test_header/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_request_params/test_cookie/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_header_param_models/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_cookie_param_models/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_header_params/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_cookie_params/*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_multiple_parameter_models.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_param_include_in_schema.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_query_cookie_header_model_extra_params.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_request_param_model_by_alias.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_dependencies/test_tutorial005.py::*",
     "key as declared: the handler reads a `Header()`/`Cookie()` parameter that the shared rule neither "
     "`vary`s on nor names as a credential, so the entry filled for one value answers requests with "
     "another (cachemw could derive `vary` from a FastAPI route's Header/Cookie params)"),
    ("fastapi", "*-catchall*", "tests/test_dependency_concurrency.py::*",
     "single-flight as declared: the test sends concurrent GETs of one URL and counts how many enter the "
     "handler or wait on FastAPI's dependency semaphore; cachemw collapses them onto one fill per key (a "
     "`sync` variant may then hang: the failed assertion skips its `release.set()`, its threads wait forever, "
     "and the timeout ends the xdist worker: reported as an error)"),
    ("fastapi", "*-catchall*", "tests/test_dependency_cache.py::*",
     "staleness as declared: a counter endpoint fetched twice; the second GET is the hit"),
    ("fastapi", "*-catchall*", "tests/test_query_optional_models.py::test_defaults_factories_and_validators",
     "staleness as declared: the test counts validator/factory calls over two GETs of one URL; the second "
     "is a hit"),
    ("fastapi", "*-catchall*", "tests/test_dependency_overrides.py::*",
     "staleness as declared: the test changes `app.dependency_overrides` between two GETs of one URL "
     "within the 2 s ttl; the second is the hit from before the change"),
    ("fastapi", "*-catchall*", "tests/test_dependency_security_overrides.py::*",
     "staleness as declared: the test changes `app.dependency_overrides` between two GETs of one URL "
     "within the 2 s ttl; the second is the hit from before the change"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_testing_dependencies/*",
     "staleness as declared: the test changes `app.dependency_overrides` between two GETs of one URL "
     "within the 2 s ttl; the second is the hit from before the change"),
    ("fastapi", "*-catchall*", "tests/test_route_handler_wrapping.py::*",
     "staleness as declared: the test changes `app.dependency_overrides` between two GETs of one URL "
     "within the 2 s ttl; the second is the hit from before the change"),
    ("fastapi", "*-catchall*", "tests/test_extra_routes.py::test_head",
     "#14 item 10 not done: `@app.head` has its own handler, but HEAD is answered from the GET entry "
     "(without the HEAD handler's `x-fastapi-item-id`); repro `head_own_handler`"),
    ("fastapi", "*-catchall*", "tests/test_request_body_limits.py::test_operation_methods_forward_limits*get*",
     "new (minor): a GET with a body but neither Content-Length nor Transfer-Encoding (possible over "
     "HTTP/2) is answered from the entry filled by another body: 200 instead of 413; cachemw/http.py "
     "`has_body` reads headers only; repro `get_body_without_length`"),
    ("fastapi", "*-catchall*", "tests/test_router_include_context.py::test_original_api_router_matches_is_called*",
     "#14 item 1, case left open: an included APIRouter subclass overrides `matches()` (FastAPI asks the "
     "included router as well as its routes); cachemw/rules.py `_kind_of` checks the route's class only, so "
     "the table caches the router's 404 and replays it to the request it does take; repro "
     "`custom_router_matches_404_cached`"),
    ("fastapi", "*-catchall*", "tests/test_router_include_context.py::test_original_api_route*_matches_is_called*",
     "#14 item 1 not done: an APIRoute subclass overrides `matches()` (needs `x-match: yes`); cachemw's "
     "table matches by path regex alone, caches the router's 404 and replays it to the request that "
     "matches; repro `custom_matches_404_cached`"),
    ("fastapi", "*-catchall*", "tests/test_router_include_context.py::test_openapi_cache_updates_after_live*",
     "staleness as declared: `/openapi.json` is a GET route too; after a live route addition the hit from "
     "before is served within the ttl"),
    ("fastapi", "*-catchall*", "tests/test_tutorial/test_sql_databases/*",
     "staleness as declared: GET /heroes/ is cached before the POSTs that add heroes (the rule declares no"
     " `invalidates`), so the list stays [] within the ttl"),
    ("fastapi", "wrap-catchall*", "tests/test_telemetry/test_tracer.py::test_tracer_lookup_preserves_warning_*",
     "as declared: 5 GETs of / are 1 miss and 4 hits, and a hit of the wrapping middleware never enters FastAPI, "
     "so its telemetry looks the tracer up once, not 5 times"),
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
    ("starlette", "*", "tests/middleware/test_base.py::*asyncio*",
     "new: Starlette's blockbuster catches blocking file reads in the event loop: cachemw/rules.py:272-274 "
     "`_known_matchers` imports fastapi (and pydantic) at every rule-table build, i.e. at the first request "
     "or lifespan, inside the loop, in an app that never imported FastAPI; fix: use fastapi only if it is "
     "already in sys.modules"),
]

RAISED_IN_CACHEMW: list[tuple[str, str, str, str]] = [
    ("*", "*", "TypeError: unhashable type: 'list'",
     "#14 item 6: TestClient's list `scope[\"server\"]` goes into the memo key of `KeyCache.key` "
     "(cachemw/keys.py:188-199), so every cached GET raises; the test sees the exception or a 500"),
    ("*", "*", "KeyError: 'headers'",
     "new (minor): an http scope without `headers` (the test's own hand-made scope) raises KeyError in "
     "`RequestHeaders.__init__` (cachemw/keys.py:35) on a cached route; the app alone never reads them"),
]

# The last resort, by the failure's message: (suite, mode, message glob, diagnosis).
FAILURE_MESSAGES: list[tuple[str, str, str, str]] = [
    ("starlette", "*", "*BlockingError: Blocking call to io.TextIOWrapper.read*",
     "new: Starlette's blockbuster catches blocking file reads in the event loop: cachemw/rules.py:272-274 "
     "`_known_matchers` imports fastapi (and pydantic) at the first rule-table build, inside the loop, in an "
     "app that never imported FastAPI (which test trips it depends on the xdist worker's order)"),
]
