"""The worklist web application (Starlette): pages rendered on the server, a little JS.

Every route but the login page and the static files needs a user (`auth.Access`);
every POST needs the session's CSRF token. Each action goes to the audit log by UID.
Patient attributes appear in the pages only: URLs carry Study UIDs and request keys,
and nothing here logs a header value. Pages and images are sent `no-store`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from abdoserve.deploy.gateway.spool import Spool, SpoolError, check_uid
from abdoserve.deploy.gateway.waiting import WaitingRequest, WaitingRequests
from abdoserve.deploy.gateway.worklist.auth import (
    CSRF_FIELD,
    Access,
    csrf_token,
    csrf_valid,
    refusal,
)
from abdoserve.deploy.gateway.worklist.inputs import InputProblem, fields_for, parse_inputs
from abdoserve.deploy.gateway.worklist.render import render_slice, slice_shape
from abdoserve.deploy.gateway.worklist.state import STATES, TITLES, list_studies, reason_of
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS

PACKAGE = "abdoserve.deploy.gateway.worklist"
SESSION_MAX_AGE_S = 8 * 3600  # a working shift
RESULT_IMAGES = ("images", "explain")  # results/<study>/<key>.<kind>/<n>.png
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
]
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate")


@dataclass(frozen=True)
class WorklistSettings:
    spool: Path
    access: Access
    session_secret: str
    on_given: Callable[[], None]  # wakes the thread that completes given requests


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, sending)


class Worklist:
    """The routes, over one spool."""

    def __init__(self, settings: WorklistSettings) -> None:
        self.settings = settings
        self.access = settings.access
        self.audit = settings.access.audit
        self.spool = Spool(settings.spool)
        self.waiting = WaitingRequests(settings.spool)
        self.templates = Environment(
            loader=PackageLoader(PACKAGE, "templates"), autoescape=select_autoescape()
        )

    def app(self) -> Starlette:
        routes = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.index, methods=["GET"]),
            Route("/requests/{study_uid}/{key}", self.request_page, methods=["GET"]),
            Route("/requests/{study_uid}/{key}/inputs", self.give_inputs, methods=["POST"]),
            Route("/requests/{study_uid}/{key}/slices/{n:int}.png", self.slice_png),
            Route("/requests/{study_uid}/{key}/{kind}/{n:int}.png", self.result_png),
            Mount(
                "/static",
                StaticFiles(packages=[(PACKAGE, "static")], follow_symlink=True),
                name="static",
            ),
        ]
        middleware = [
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=self.settings.session_secret,
                session_cookie="abdoserve_worklist",
                max_age=SESSION_MAX_AGE_S,
                same_site="strict",
                https_only=True,  # Secure; HttpOnly is always set
            ),
        ]
        return Starlette(routes=routes, middleware=middleware)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        template = self.templates.get_template(name)
        context = {"csrf_field": CSRF_FIELD, "csrf_token": csrf_token(request), **context}
        return HTMLResponse(template.render(**context), status_code=status)

    # Sign in and out --------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.access.user(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self.page(request, "login.html", user=None, problem=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_valid(request, form):
            return self._csrf_refused(request, None)
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        if not await run_in_threadpool(self.access.log_in, request, name, password):
            problem = "Unknown user or wrong password."
            return self.page(request, "login.html", 401, user=None, problem=problem)
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_valid(request, form):
            return self._csrf_refused(request, self.access.user(request))
        self.access.log_out(request)
        return RedirectResponse("/login", status_code=303)

    # Pages ------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        user = self.access.user(request)
        if user is None:
            return refusal(request)
        rows = await run_in_threadpool(list_studies, self.settings.spool)
        return self.page(request, "index.html", user=user, rows=rows, states=STATES, titles=TITLES)

    async def request_page(self, request: Request) -> Response:
        user = self.access.user(request)
        if user is None:
            return refusal(request)
        study_uid, key = request.path_params["study_uid"], request.path_params["key"]
        outcome = self._outcome(study_uid, key)
        if outcome is None:
            return Response("no such request", status_code=404)
        self.audit.record("view_study", user, study_uid=study_uid, key=key)
        waiting = self.waiting.get(study_uid, key)
        if waiting is not None and waiting.given() is None:
            return await self._input_page(request, user, waiting, outcome, None)
        context = self._request_context(study_uid, key, waiting, outcome)
        return self.page(request, "request.html", user=user, **context)

    def _outcome(self, study_uid: str, key: str) -> dict[str, Any] | None:
        """The request's recorded outcome; None for anything not a UID and a key."""
        if not (_is_uid(study_uid) and _is_key(key)):
            return None
        return self.spool.outcome(study_uid, key)

    def _request_context(
        self, study_uid: str, key: str, waiting: WaitingRequest | None, outcome: dict[str, Any]
    ) -> dict[str, Any]:
        folder = self.spool.results / study_uid
        return {
            "study_uid": study_uid,
            "key": key,
            "outcome": outcome,
            "in_work": waiting is not None,
            "reason": reason_of(outcome),
            "result_copy": outcome.get("result", {}),
            "images": _numbered(folder / f"{key}.images"),
            "explain": _numbered(folder / f"{key}.explain"),
            "explanation": _read_json(folder / f"{key}.explain" / "explanation.json"),
        }

    async def _input_page(
        self,
        request: Request,
        user: str,
        waiting: WaitingRequest,
        outcome: dict[str, Any],
        problem: str | None,
    ) -> Response:
        spec = TASKS[waiting.request.task]
        patient = await run_in_threadpool(_patient, waiting.files()[0])
        return self.page(
            request,
            "inputs.html",
            400 if problem else 200,
            user=user,
            waiting=waiting,
            spec=spec,
            fields=fields_for(spec, waiting.request.missing),
            slices=range(len(waiting.request.instances)),
            patient=patient,
            reason=reason_of(outcome),
            problem=problem,
        )

    # Giving inputs ----------------------------------------------------------------------

    async def give_inputs(self, request: Request) -> Response:
        user = self.access.user(request)
        if user is None:
            return refusal(request)
        form = await request.form()
        study_uid, key = request.path_params["study_uid"], request.path_params["key"]
        if not csrf_valid(request, form):
            return self._csrf_refused(request, user, study_uid, key)
        outcome = self._outcome(study_uid, key)
        waiting = self.waiting.get(study_uid, key)
        if outcome is None or (waiting is None and outcome.get("status") == "needs_input"):
            return Response("no request waits for input here", status_code=404)
        if waiting is None or waiting.given() is not None:  # a second submit sends nothing
            return self._given_already(user, study_uid, key)
        return await self._give(request, user, waiting, outcome, form)

    async def _give(
        self,
        request: Request,
        user: str,
        waiting: WaitingRequest,
        outcome: dict[str, Any],
        form: FormData,
    ) -> Response:
        """Check the inputs as the server would, then record them once and wake the
        completion; a wrong value shows the page again with the reason."""
        spec = TASKS[waiting.request.task]
        missing = waiting.request.missing
        try:
            shape = _shape_of(waiting, spec)
            inputs = await run_in_threadpool(parse_inputs, spec, missing, form, shape)
        except InputProblem as error:
            return await self._input_page(request, user, waiting, outcome, str(error))
        study_uid, key = waiting.study_uid, waiting.key
        if not self.waiting.give(waiting, inputs, user):  # two racing submits: one wins
            return self._given_already(user, study_uid, key)
        self.audit.record("give_inputs", user, study_uid=study_uid, key=key, inputs=list(inputs))
        self.settings.on_given()
        return RedirectResponse(f"/requests/{study_uid}/{key}", status_code=303)

    def _given_already(self, user: str, study_uid: str, key: str) -> Response:
        detail = "already given"
        self.audit.record("give_inputs_refused", user, study_uid=study_uid, key=key, detail=detail)
        return RedirectResponse(f"/requests/{study_uid}/{key}", status_code=303)

    def _csrf_refused(
        self,
        request: Request,
        user: str | None,
        study_uid: str | None = None,
        key: str | None = None,
    ) -> Response:
        self.audit.record(
            "csrf_refused", user, study_uid=study_uid, key=key, detail=request.url.path
        )
        return Response("the form's CSRF token is missing or wrong", status_code=403)

    # Images -----------------------------------------------------------------------------

    async def slice_png(self, request: Request) -> Response:
        if self.access.user(request) is None:
            return refusal(request)
        params = request.path_params
        waiting = self.waiting.get(params["study_uid"], params["key"])
        n = int(params["n"])
        if waiting is None or not 0 <= n < len(waiting.request.instances):
            return Response("no such slice", status_code=404)
        spec = TASKS[waiting.request.task]
        rendered = await run_in_threadpool(render_slice, waiting.files()[n], spec)
        return Response(rendered.png, media_type="image/png")

    async def result_png(self, request: Request) -> Response:
        if self.access.user(request) is None:
            return refusal(request)
        params = request.path_params
        study_uid, key, kind = params["study_uid"], params["key"], params["kind"]
        if kind not in RESULT_IMAGES or self._outcome(study_uid, key) is None:
            return Response("no such image", status_code=404)
        path = self.spool.results / study_uid / f"{key}.{kind}" / f"{int(params['n'])}.png"
        if not path.is_file():
            return Response("no such image", status_code=404)
        return Response(path.read_bytes(), media_type="image/png")


def _is_key(key: str) -> bool:
    return key.isalnum() and key.islower() and len(key) <= 64


def _is_uid(value: str) -> bool:
    try:
        check_uid(value, "StudyInstanceUID")
    except SpoolError:
        return False
    return True


def _shape_of(waiting: WaitingRequest, spec: TaskSpec) -> Callable[[], tuple[int, int]]:
    return lambda: slice_shape(waiting.files()[0], spec)


def _numbered(folder: Path) -> list[int]:
    """The n of every <n>.png in `folder`, in order."""
    if not folder.is_dir():
        return []
    return sorted(int(path.stem) for path in folder.glob("*.png") if path.stem.isdigit())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _patient(file: Path) -> dict[str, str]:
    """What identifies the patient on the page (and only there)."""
    header = pydicom.dcmread(file, stop_before_pixels=True)
    return {keyword: str(header.get(keyword, "")) for keyword in PATIENT_KEYWORDS}
