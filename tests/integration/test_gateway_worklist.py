"""The gateway's web worklist in a real browser: Debian's chromium, driven by Selenium
through chromium-driver, against `abdoserve gateway` as its own process (HTTPS with the
tests' own certificates), a real Triton, dcmtk's storescu as the modality and Orthanc
as the PACS.

A liver-mass study waits for its ROI: a user logs in, draws the box with the mouse on
the rendered slice and submits; the SR appears in Orthanc with the class `abdoserve
infer` gives for that ROI. The same for HBV/HCV on an MRI study. A request without login
and a POST without the CSRF token are refused; no patient name reaches the logs.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from abdoserve.deploy.embedded import EmbeddedServer, free_port
from abdoserve.deploy.gateway.waiting import WaitingRequests
from abdoserve.deploy.gateway.worklist.users import set_password
from abdoserve.loadtests.dicom_peers import Orthanc
from tests.integration.gateway_fixtures import built_repository, running_orthanc, running_triton
from tests.integration.gateway_process import GatewayProcess, wait_until
from tests.integration.test_gateway import (
    DISTINCTIVE_ID,
    DISTINCTIVE_NAME,
    RULES,
    numbers,
    pacs_destination,
    phantom,
    push,
    study_uid,
    url,
    wait_for_report,
)
from tests.pki import Pki, make_pki

TASKS = ("liver_mass_ct", "liver_fibrosis_mri")
USER, PASSWORD = "alice", "correct horse battery"
SURNAME = DISTINCTIVE_NAME.split("^", maxsplit=1)[0]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_repository(tmp_path_factory, "worklist-tasks", TASKS)


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with running_triton(repository, tmp_path_factory, "worklist-triton") as running:
        yield running


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory, "worklist-orthanc") as instance:
        yield instance


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("worklist-pki"))


@pytest.fixture
def gateway(
    tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc, pki: Pki
) -> Iterator[GatewayProcess]:
    orthanc.delete_all()
    users = tmp_path / "users"
    set_password(users, USER, PASSWORD)
    web = [
        "--web-port",
        str(free_port()),
        "--web-users",
        str(users),
        "--tls-cert",
        str(pki.server.certificate),
        "--tls-key",
        str(pki.server.key),
    ]
    process = GatewayProcess(
        folder=tmp_path / "gateway",
        rules=RULES,
        grpc_url=url(triton),
        destinations=pacs_destination(orthanc),
        extra=web,
        explanation_maps=True,  # the answered page shows them
    )
    with process:
        yield process
    for text in (process.log_text(), audit_text(process)):
        assert SURNAME not in text
        assert DISTINCTIVE_ID not in text


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root in a container
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",  # the tests' own CA
        "--window-size=1400,1300",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def web_port(gateway: GatewayProcess) -> int:
    return int(gateway.extra[gateway.extra.index("--web-port") + 1])


def base(gateway: GatewayProcess) -> str:
    return f"https://127.0.0.1:{web_port(gateway)}"


def audit_text(gateway: GatewayProcess) -> str:
    path = gateway.spool / "worklist" / "audit.jsonl"
    return path.read_text() if path.exists() else ""


def audit(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_text(gateway).splitlines()]


def needs_input(gateway: GatewayProcess, study: str) -> str:
    """Wait until the study's request is recorded as needs input; its key."""
    folder = gateway.spool / "results" / study

    def recorded() -> bool:
        return any(
            json.loads(path.read_text()).get("status") == "needs_input"
            for path in folder.glob("*.outcome.json")
        )

    wait_until(recorded, "the study to need input")
    (path,) = folder.glob("*.outcome.json")
    return path.name.removesuffix(".outcome.json")


def completed(gateway: GatewayProcess, study: str, key: str) -> dict[str, Any]:
    """Wait until the request's outcome is recorded past needs input (after its SR is queued)."""
    wait_until(
        lambda: outcome(gateway, study, key)["status"] != "needs_input", "the recorded outcome"
    )
    return outcome(gateway, study, key)


def outcome(gateway: GatewayProcess, study: str, key: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        (gateway.spool / "results" / study / f"{key}.outcome.json").read_text()
    )
    return result


def plain_request(
    gateway: GatewayProcess, pki: Pki, method: str, path: str, **kwargs: Any
) -> tuple[int, str]:
    """A request outside the browser (no redirect followed), trusting the tests' CA."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    connection = http.client.HTTPSConnection("127.0.0.1", web_port(gateway), context=context)
    try:
        connection.request(method, path, **kwargs)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def log_in(browser: WebDriver, gateway: GatewayProcess) -> None:
    browser.delete_all_cookies()
    browser.get(base(gateway) + "/")
    assert browser.current_url.endswith("/login")  # no patient data without login
    browser.find_element(By.ID, "name").send_keys(USER)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "sign-in").click()
    wait_until(lambda: browser.find_elements(By.ID, "state-needs_input"), "the worklist")


def open_waiting(browser: WebDriver, study: str) -> None:
    row = browser.find_element(By.CSS_SELECTOR, f'#state-needs_input tr[data-study="{study}"]')
    row.find_element(By.CSS_SELECTOR, "a.give").click()
    wait_until(lambda: browser.find_elements(By.ID, "submit"), "the input page")


def wait_for_answered_page(browser: WebDriver) -> None:
    def answered() -> bool:
        states = browser.find_elements(By.CSS_SELECTOR, '#state[data-status="answered"]')
        return bool(states)

    wait_until(answered, "the answered page")


def check_answered_mass_page(browser: WebDriver, answer: dict[str, Any]) -> None:
    """The answer, its version, the key images and the explanation maps on the page."""
    wait_for_answered_page(browser)
    version = browser.find_element(By.ID, "model-version").text
    assert version == str(answer["model"]["version"])
    label = browser.find_element(By.CSS_SELECTOR, '#answer td[data-name="label"]').text
    assert label == answer["result"]["label"]
    key_images = browser.find_elements(By.CSS_SELECTOR, "img.key-image")
    assert len(key_images) == 3  # the three phases, kept as PNGs after the instances went
    assert all(image.get_property("naturalWidth") == 512 for image in key_images)
    maps = browser.find_elements(By.CSS_SELECTOR, "img.explanation-map")
    assert len(maps) == 3  # one per phase, from the version that answered
    assert all(image.get_property("naturalWidth") == 512 for image in maps)


def report_class(report: Dataset) -> str:
    """The liver mass category the SR codes (LMC-A..E -> A..E)."""
    found = coded_values(report, "LMC")
    assert len(found) == 1, f"{len(found)} liver mass categories in the report"
    return found[0].removeprefix("LMC-")


def coded_values(item: Dataset, concept: str) -> list[str]:
    """Every CODE content item named `concept`, depth first: its value's code."""
    found: list[str] = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "CODE" and child.ConceptNameCodeSequence[0].CodeValue == concept:
            found.append(str(child.ConceptCodeSequence[0].CodeValue))
        found += coded_values(child, concept)
    return found


def infer(task: str, folder: Path, server: EmbeddedServer, *flags: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "abdoserve.deploy.cli", "infer", task, str(folder)]
    done = subprocess.run(
        [*command, *flags, "--json", "--url", url(server)],
        capture_output=True,
        text=True,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)["answer"]
    return answer


def test_without_login_nothing_and_a_form_without_its_csrf_token_is_refused(
    gateway: GatewayProcess, browser: WebDriver, pki: Pki, tmp_path: Path
) -> None:
    paths = phantom("liver_mass_ct", tmp_path / "study", seed=5)
    push(gateway, paths)
    study = study_uid(paths)
    key = needs_input(gateway, study)
    page = f"/requests/{study}/{key}"
    for path in ("/", page):
        status, body = plain_request(gateway, pki, "GET", path)
        assert status == 303 and SURNAME not in body
    assert plain_request(gateway, pki, "GET", f"{page}/slices/0.png")[0] == 403
    log_in(browser, gateway)
    cookie = browser.get_cookie("abdoserve_worklist")
    assert cookie is not None and cookie["secure"] and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    body = urllib.parse.urlencode({"roi_box": "100,100,200,200", "roi_view": "512,512"})
    headers = {
        "Cookie": f"abdoserve_worklist={cookie['value']}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    status, _ = plain_request(gateway, pki, "POST", f"{page}/inputs", body=body, headers=headers)
    assert status == 403
    assert outcome(gateway, study, key)["status"] == "needs_input"
    assert not (gateway.spool / "waiting" / study / key / "given.json").exists()
    actions = [entry["action"] for entry in audit(gateway)]
    assert actions == ["login", "csrf_refused"]


def test_a_liver_mass_roi_drawn_with_the_mouse_sends_the_sr_infer_gives_for_it(  # noqa: PLR0917
    gateway: GatewayProcess,
    browser: WebDriver,
    orthanc: Orthanc,
    triton: EmbeddedServer,
    pki: Pki,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "study"
    paths = phantom("liver_mass_ct", folder, seed=7)
    push(gateway, paths)
    study = study_uid(paths)
    key = needs_input(gateway, study)
    log_in(browser, gateway)
    open_waiting(browser, study)
    assert SURNAME in browser.find_element(By.ID, "patient-name").text  # on the page only
    r0, c0, r1, c1 = json.loads((folder / "request.json").read_text())["roi"]
    image = browser.find_element(By.ID, "slice-0")
    width, height = image.size["width"], image.size["height"]
    assert (width, height) == (512, 512)  # shown at its own matrix: a pixel is a pixel
    # from the top-left edge of pixel (r0, c0) to the bottom-right edge of (r1, c1)
    ActionChains(browser).move_to_element_with_offset(
        image, c0 - width // 2, r0 - height // 2
    ).click_and_hold().move_to_element_with_offset(
        image, c1 + 1 - width // 2, r1 + 1 - height // 2
    ).release().perform()
    token = browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    cookie = browser.get_cookie("abdoserve_worklist")
    box = browser.find_element(By.ID, "roi_box").get_attribute("value")
    assert box, "no box was drawn"
    browser.find_element(By.ID, "submit").click()
    # A second submit of the same form (a double click, a resent POST) sends nothing more.
    again = urllib.parse.urlencode({"csrf_token": token, "roi_box": box, "roi_view": "512,512"})
    headers = {
        "Cookie": f"abdoserve_worklist={cookie['value']}",  # type: ignore[index]
        "Content-Type": "application/x-www-form-urlencoded",
    }
    page = f"/requests/{study}/{key}/inputs"
    assert plain_request(gateway, pki, "POST", page, body=again, headers=headers)[0] == 303

    report = wait_for_report(orthanc, study)  # exactly one SR for the study
    recorded = completed(gateway, study, key)
    assert recorded["status"] == "answered"
    assert recorded["given"]["by"] == USER
    roi = recorded["given"]["inputs"]["roi"]
    assert all(abs(got - want) <= 1 for got, want in zip(roi, [r0, c0, r1, c1], strict=True))
    answer = infer("liver_mass_ct", folder, triton, "--roi", *map(str, roi))
    assert report_class(report) == answer["result"]["label"]
    assert recorded["result"]["result"]["label"] == answer["result"]["label"]
    assert not (gateway.spool / "waiting" / study).exists()  # removed once answered

    check_answered_mass_page(browser, answer)
    actions = [(entry["action"], entry.get("study_uid")) for entry in audit(gateway)]
    assert ("give_inputs", study) in actions and ("give_inputs_refused", study) in actions
    given = next(entry for entry in audit(gateway) if entry["action"] == "give_inputs")
    assert (given["user"], given["key"], given["inputs"]) == (USER, key, ["roi"])


def test_hbv_and_hcv_given_on_the_page_send_the_mri_sr_infer_gives_for_them(
    gateway: GatewayProcess,
    browser: WebDriver,
    orthanc: Orthanc,
    triton: EmbeddedServer,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "study"
    paths = phantom("liver_fibrosis_mri", folder, seed=11, hbv="positive", hcv="negative")
    push(gateway, paths)
    study = study_uid(paths)
    key = needs_input(gateway, study)
    assert outcome(gateway, study, key)["missing"] == ["hbv", "hcv"]
    log_in(browser, gateway)
    open_waiting(browser, study)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".slice img")) == 3  # the three levels
    Select(browser.find_element(By.ID, "input-hbv")).select_by_value("positive")
    Select(browser.find_element(By.ID, "input-hcv")).select_by_value("negative")
    browser.find_element(By.ID, "submit").click()

    report = wait_for_report(orthanc, study)
    recorded = completed(gateway, study, key)
    assert recorded["given"]["inputs"] == {"hbv": "positive", "hcv": "negative"}
    answer = infer("liver_fibrosis_mri", folder, triton)  # request.json: the same inputs
    expected = float(answer["result"]["F_DLMRI"])
    values = [value for _, value in numbers(report)]
    assert any(abs(value - expected) <= 1e-6 * max(1.0, abs(expected)) for value in values)
    wait_for_answered_page(browser)
    stage = browser.find_element(By.CSS_SELECTOR, '#answer td[data-name="stage"]').text
    assert stage == answer["result"]["stage"]
    evidence = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert set(recorded["instances"]) <= evidence


def test_inputs_given_before_a_stop_are_completed_at_the_next_start(
    gateway: GatewayProcess, orthanc: Orthanc, triton: EmbeddedServer, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    paths = phantom("liver_mass_ct", folder, seed=9)
    push(gateway, paths)
    study = study_uid(paths)
    key = needs_input(gateway, study)
    assert gateway.stop() == 0
    # What a submit records, with the gateway down before its thread could send anything.
    roi = json.loads((folder / "request.json").read_text())["roi"]
    waiting = WaitingRequests(gateway.spool).get(study, key)
    assert waiting is not None and WaitingRequests(gateway.spool).give(waiting, {"roi": roi}, USER)
    gateway.start()
    report = wait_for_report(orthanc, study)
    recorded = completed(gateway, study, key)
    assert recorded["given"]["inputs"] == {"roi": roi}
    answer = infer("liver_mass_ct", folder, triton)  # request.json holds the same ROI
    assert report_class(report) == answer["result"]["label"]
    wait_until(lambda: not (gateway.spool / "waiting" / study).exists(), "the instances removed")
