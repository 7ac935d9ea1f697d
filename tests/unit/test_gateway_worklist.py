"""The gateway's web worklist in this process: users, audit log, ROI conversion, the state
listing, and the app itself through Starlette's TestClient (login, CSRF, giving inputs)
on a real spool holding a phantom liver-mass study that needs its ROI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pydicom
import pytest
from argon2 import PasswordHasher
from PIL import Image
from starlette.testclient import TestClient

from abdoserve.deploy.gateway.routing import RoutedRequest
from abdoserve.deploy.gateway.spool import ClaimedStudy, Spool
from abdoserve.deploy.gateway.waiting import WaitingRequests
from abdoserve.deploy.gateway.worklist.app import Worklist, WorklistSettings
from abdoserve.deploy.gateway.worklist.audit import AuditLog
from abdoserve.deploy.gateway.worklist.auth import Access
from abdoserve.deploy.gateway.worklist.roi import DrawnBox, parse_box, roi_from_box
from abdoserve.deploy.gateway.worklist.state import list_studies
from abdoserve.deploy.gateway.worklist.users import (
    Users,
    UsersError,
    load_users,
    parse_users,
    set_password,
)
from abdoserve.export.phantom.studies import build_study
from abdoserve.preprocessing.errors import RoiError

# Fast hashes: the tests check the flow, not argon2's cost.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PATIENT = "Zyqxwv^Worklist"
KEY = "a" * 24


# Users ------------------------------------------------------------------------------------


def test_a_user_added_to_the_file_verifies_with_their_password_only(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "correct horse", FAST)
    set_password(path, "bob", "battery staple", FAST)
    set_password(path, "alice", "new password", FAST)  # replaced, not repeated
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    assert all(line.split(":", 1)[1].startswith("$argon2id$") for line in lines)
    users = load_users(path)
    assert users.verify("alice", "new password")
    assert not users.verify("alice", "correct horse")
    assert not users.verify("carol", "new password")  # unknown: checked against a decoy
    assert "new password" not in path.read_text()


def test_a_bad_users_file_names_its_line_and_never_a_hash() -> None:
    with pytest.raises(UsersError, match=r"users, line 2: expected NAME:\$argon2id"):
        parse_users("alice:$argon2id$v=19$x\nbob:plaintext\n", "users")
    with pytest.raises(UsersError, match="line 2: user alice is listed twice"):
        parse_users("alice:$argon2id$a\nalice:$argon2id$b\n", "users")
    with pytest.raises(UsersError, match="user name"):
        set_password(Path("/nonexistent/users"), "a b", "long enough", FAST)
    with pytest.raises(UsersError, match="at least 8"):
        set_password(Path("/nonexistent/users"), "alice", "short", FAST)


# Audit log --------------------------------------------------------------------------------


def test_the_audit_log_appends_whole_lines_with_uids_and_input_names(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.record("login", "alice")
    audit.record("give_inputs", "alice", study_uid="1.2.3", key=KEY, inputs=["hcv", "hbv"])
    first = (tmp_path / "audit.jsonl").read_bytes()
    audit.record("logout", "alice")
    assert (tmp_path / "audit.jsonl").read_bytes().startswith(first)  # never rewritten
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    entries = audit.entries()
    assert [entry["action"] for entry in entries] == ["login", "give_inputs", "logout"]
    assert entries[1]["inputs"] == ["hbv", "hcv"]
    assert set(entries[1]) == {"time", "action", "user", "study_uid", "key", "inputs"}
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.record("anything", "alice")


# ROI conversion ---------------------------------------------------------------------------


def test_a_box_drawn_at_full_size_covers_exactly_the_pixels_under_it() -> None:
    box = DrawnBox(x0=120, y0=100, x1=150.0, y1=140.0, view_width=512, view_height=512)
    # rows 100..139 and columns 120..149 lie under it: the inclusive ROI the phantom writes
    assert roi_from_box(box, (512, 512)) == [100, 120, 139, 149]


def test_a_box_drawn_on_a_scaled_image_is_scaled_back_and_any_corner_order_works() -> None:
    # a 512 px image shown at 256 px: every displayed pixel is two image pixels
    box = DrawnBox(x0=75.0, y0=70.25, x1=60.0, y1=50.0, view_width=256, view_height=256)
    assert roi_from_box(box, (512, 512)) == [100, 120, 140, 149]


def test_a_box_past_the_edges_is_clipped_to_the_image() -> None:
    box = DrawnBox(x0=-20, y0=500, x1=40, y1=600, view_width=512, view_height=512)
    assert roi_from_box(box, (512, 512)) == [500, 0, 511, 39]


def test_a_click_or_a_line_is_no_roi_and_the_form_must_hold_numbers() -> None:
    with pytest.raises(RoiError, match="roi is empty"):
        roi_from_box(DrawnBox(10, 10, 10.5, 10.5, 512, 512), (512, 512))
    with pytest.raises(RoiError, match="draw a box"):
        parse_box("", "512,512")
    with pytest.raises(RoiError, match="draw a box"):
        parse_box("1,2,3,nan", "512,512")
    with pytest.raises(RoiError, match="no size"):
        parse_box("1,2,3,4", "0,512")
    assert parse_box("1,2,3.5,4", "256,128") == DrawnBox(1, 2, 3.5, 4, 256, 128)


# A spool with one liver-mass study waiting for its ROI --------------------------------------


def liver_mass_files(folder: Path) -> tuple[str, list[str]]:
    """The phantom liver-mass study in `folder` as <SOP>.dcm, with a patient name."""
    folder.mkdir(parents=True)
    sops = []
    study_uid = ""
    for data in build_study("liver_mass_ct", seed=3).instances:
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.PatientName = PATIENT
        study_uid, sop = str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID)
        dataset.save_as(folder / f"{sop}.dcm")
        sops.append(sop)
    return study_uid, sops


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    spool = Spool(root)
    study_uid, sops = liver_mass_files(tmp_path / "claimed")
    study = ClaimedStudy(study_uid, tmp_path / "claimed", 1000.0, 1001.0)
    request = RoutedRequest(
        rule="liver-mass-dynamic-ct",
        task="liver_mass_ct",
        series_uids=("1.2.3",),
        instances=tuple(sops),
        clinical={},
        missing=("roi",),
    )
    WaitingRequests(root).keep(study, KEY, request, study.instance_files())
    outcome = {"study_uid": study_uid, "task": "liver_mass_ct", "status": "needs_input"}
    spool.record_outcome(study_uid, KEY, {**outcome, "missing": ["roi"], "problem": None})
    answered = {"study_uid": "1.2.9", "task": "bone_density_ct", "status": "answered"}
    result = {"result": {"BMD": 0.8}, "model": {"name": "bone_density_ct", "version": "1"}}
    spool.record_outcome("1.2.9", "b" * 24, {**answered, "result": result})
    spool.record_outcome("1.2.10", "c" * 24, {"status": "failed", "code": "X", "message": "m"})
    spool.store_instance("1.2.11", "1.2.11.1", b"DICM")
    return root


def test_the_state_listing_reads_every_state_from_the_spool(spool_root: Path) -> None:
    rows = list_studies(spool_root)
    assert {state: len(items) for state, items in rows.items()} == {
        "received": 1,
        "in_work": 0,
        "needs_input": 1,
        "answered": 1,
        "failed": 1,
    }
    (waiting,) = rows["needs_input"]
    assert (waiting.key, waiting.reason, waiting.can_give) == (KEY, "missing roi", True)
    assert rows["answered"][0].reason == "by bone_density_ct version 1"
    assert rows["failed"][0].reason == "X: m"
    assert rows["received"][0].reason == "1 instances received"
    waiting_request = WaitingRequests(spool_root).get(waiting.study_uid, KEY)
    assert waiting_request is not None and waiting_request.given() is None  # nobody gave yet
    WaitingRequests(spool_root).give(waiting_request, {"roi": [1, 2, 3, 4]}, "alice")
    rows = list_studies(spool_root)
    assert len(rows["needs_input"]) == 0
    assert rows["in_work"][0].reason == "inputs given by alice; being answered"


# The app ----------------------------------------------------------------------------------


@pytest.fixture
def client(spool_root: Path, tmp_path: Path) -> TestClient:
    users = Users({"alice": FAST.hash("correct horse")}, FAST)
    access = Access(users, None, AuditLog(tmp_path / "audit.jsonl"))
    woken: list[int] = []
    settings = WorklistSettings(spool_root, access, "k" * 64, lambda: woken.append(1))
    # https: the session cookie is Secure, so plain HTTP would never send it back
    return TestClient(Worklist(settings).app(), base_url="https://testserver")


def token(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found[1]


def log_in(client: TestClient) -> None:
    page = client.get("/login").text
    form = {"csrf_token": token(page), "name": "alice", "password": "correct horse"}
    assert client.post("/login", data=form, follow_redirects=False).status_code == 303


def waiting_page(client: TestClient, spool_root: Path) -> tuple[str, str]:
    (row,) = list_studies(spool_root)["needs_input"]
    return f"/requests/{row.study_uid}/{row.key}", row.study_uid


def test_nothing_but_the_login_page_without_a_user(client: TestClient, spool_root: Path) -> None:
    path, _ = waiting_page(client, spool_root)
    for url in ("/", path):
        response = client.get(url, follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (303, "/login")
        assert PATIENT.split("^", maxsplit=1)[0] not in response.text
    assert client.get(f"{path}/slices/0.png").status_code == 403
    assert client.post(f"{path}/inputs", data={"roi_box": "1,1,9,9"}).status_code == 403


def test_the_session_cookie_is_secure_httponly_and_samesite(client: TestClient) -> None:
    response = client.get("/login")
    cookie = response.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert response.headers["cache-control"] == "no-store"


def test_the_script_and_style_are_served_from_the_installed_package(client: TestClient) -> None:
    script = client.get("/static/worklist.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "roi_box" in script.text
    assert client.get("/static/worklist.css").headers["content-type"].startswith("text/css")


def test_a_login_without_the_csrf_token_or_with_a_wrong_password_is_refused(
    client: TestClient, tmp_path: Path
) -> None:
    client.get("/login")
    form = {"name": "alice", "password": "correct horse"}
    assert client.post("/login", data=form).status_code == 403
    form["csrf_token"] = token(client.get("/login").text)
    form["password"] = "wrong horse"
    assert client.post("/login", data=form).status_code == 401
    assert client.get("/", follow_redirects=False).status_code == 303
    actions = [entry["action"] for entry in AuditLog(tmp_path / "audit.jsonl").entries()]
    assert actions == ["csrf_refused", "login_refused"]


def test_a_user_sees_the_slices_and_gives_the_roi_once(
    client: TestClient, spool_root: Path, tmp_path: Path
) -> None:
    log_in(client)
    path, study_uid = waiting_page(client, spool_root)
    page = client.get(path)
    assert page.status_code == 200 and PATIENT in page.text
    png = client.get(f"{path}/slices/1.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (512, 512)
    form = {"roi_box": "200,150,260,230", "roi_view": "512,512"}
    refused = client.post(f"{path}/inputs", data=form)  # no token: refused, nothing given
    assert refused.status_code == 403
    assert WaitingRequests(spool_root).get(study_uid, KEY).given() is None  # type: ignore[union-attr]
    form["csrf_token"] = token(page.text)
    assert client.post(f"{path}/inputs", data=form, follow_redirects=False).status_code == 303
    again = {**form, "roi_box": "0,0,50,50"}  # a double submit changes nothing
    assert client.post(f"{path}/inputs", data=again, follow_redirects=False).status_code == 303
    given = WaitingRequests(spool_root).get(study_uid, KEY).given()  # type: ignore[union-attr]
    assert given is not None  # the first submit's inputs, not the second's:
    assert (dict(given.inputs), given.user) == ({"roi": [150, 200, 229, 259]}, "alice")
    entries = AuditLog(tmp_path / "audit.jsonl").entries()
    assert [entry["action"] for entry in entries] == [
        "login",
        "view_study",
        "csrf_refused",
        "give_inputs",
        "give_inputs_refused",
    ]
    assert entries[3] == {**entries[3], "study_uid": study_uid, "key": KEY, "inputs": ["roi"]}
    text = json.dumps(entries)
    assert PATIENT not in text and "150" not in text  # UIDs and names only, no values
    assert "In work" in client.get(path).text


def test_a_box_that_is_no_roi_is_refused_on_the_page(client: TestClient, spool_root: Path) -> None:
    log_in(client)
    path, study_uid = waiting_page(client, spool_root)
    form = {"csrf_token": token(client.get(path).text), "roi_box": "5,5,5,5", "roi_view": "512,512"}
    response = client.post(f"{path}/inputs", data=form)
    assert response.status_code == 400
    assert "Mass region of interest: roi is empty" in response.text
    assert WaitingRequests(spool_root).get(study_uid, KEY).given() is None  # type: ignore[union-attr]


def test_a_proxy_header_names_the_user_and_a_bad_name_is_nobody(
    spool_root: Path, tmp_path: Path
) -> None:
    access = Access(None, "X-Remote-User", AuditLog(tmp_path / "audit.jsonl"))
    settings = WorklistSettings(spool_root, access, "k" * 64, lambda: None)
    client = TestClient(Worklist(settings).app(), base_url="https://testserver")
    assert client.get("/", headers={"X-Remote-User": "carol"}).status_code == 200
    refused = client.get("/", headers={"X-Remote-User": "<script>"}, follow_redirects=False)
    assert refused.status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "path",
    [
        "/requests/../{key}",  # the spool's own folders, by a dot-dot
        "/requests/%2e%2e/%2e%2e",
        "/requests/{study}/..",
        "/requests/{study}/{key}/slices/99.png",  # no such slice
        "/requests/{study}/{key}/explain/0.png",  # not answered: no maps
        "/requests/1.2.3.4/{key}",  # a UID that names nothing
        "/requests/{study}/" + "b" * 24,
    ],
)
def test_a_logged_in_user_reaches_nothing_but_the_studies_by_any_path(
    client: TestClient, spool_root: Path, path: str
) -> None:
    log_in(client)
    page, study_uid = waiting_page(client, spool_root)
    response = client.get(path.format(study=study_uid, key=KEY), follow_redirects=False)
    assert response.status_code in (400, 404)
    assert PATIENT not in response.text
    assert client.get(page).status_code == 200  # and the worklist still serves


def test_a_form_far_larger_than_any_input_is_refused_and_nothing_is_given(
    client: TestClient, spool_root: Path
) -> None:
    log_in(client)
    path, study_uid = waiting_page(client, spool_root)
    form = {
        "csrf_token": token(client.get(path).text),
        "roi_box": "200,150,260,230",
        "roi_view": "512,512",
        "padding": "x" * (4 * 1024 * 1024),
    }
    response = client.post(f"{path}/inputs", data=form, follow_redirects=False)
    assert response.status_code in (400, 413)
    assert WaitingRequests(spool_root).get(study_uid, KEY).given() is None  # type: ignore[union-attr]
