"""The console in real headless Chromium against `make run`'s stack (issue 19, acceptance 1,
2 and 4): sec signs in through the OIDC code flow with PKCE, finds alice's denied DROP TABLE
by filtering and reads its rule, approves dana's pending UPDATE (which then runs when dana
re-submits) while the inbox updates live; a forged form post without the CSRF token is
refused; alice, signed in with the dev sign-in, sees only her own events; and no masked
value or parameter value appears on any page the two of them saw.

Screenshots of each page go to $QUERYGATE_CONSOLE_SCREENSHOTS (docs/console/ holds the
committed ones) or the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import Stack

pytestmark = pytest.mark.browser

PARAM = f"qgparam{uuid.uuid4().hex[:12]}"  # bound as a parameter, never to be shown
SECOND_PARAM = f"qgparam{uuid.uuid4().hex[:12]}"


class Seen:
    """Every page either browser showed, to scan for values that must never appear."""

    def __init__(self, shots: Path) -> None:
        self.pages: dict[str, str] = {}
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def keep(self, driver: WebDriver, name: str, shot: bool = True) -> None:
        self.pages[f"{name} {driver.current_url}"] = driver.page_source
        if shot:
            driver.save_screenshot(str(self.shots / f"{name}.png"))


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Seen:
    target = os.environ.get("QUERYGATE_CONSOLE_SCREENSHOTS")
    return Seen(Path(target) if target else tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def scenario(stack: Stack) -> dict[str, Any]:
    """What the API clients did before anyone opens the console."""
    denied = stack.query("alice", "DROP TABLE orders")
    assert denied.status_code == 403, denied.text
    read = "SELECT email, ssn, card_number FROM customers WHERE full_name <> $1 AND id <= 3"
    masked = stack.query("alice", read, [PARAM])
    assert masked.status_code == 200, masked.text
    raw = stack.query("pat", read, [PARAM])
    assert raw.status_code == 200, raw.text
    update = "UPDATE customers SET country = $1 WHERE id = $2"
    held = stack.query("dana", update, [PARAM, 7])
    assert held.status_code == 202, held.text
    secrets = {PARAM, SECOND_PARAM}
    for row in masked.json()["rows"] + raw.json()["rows"]:
        secrets.update(v for v in row if isinstance(v, str) and len(v) >= 6)
    # The masked forms hold the last digits; the raw values are what masking protects.
    assert any("*" in v for v in secrets) and any("@" in v and "*" not in v for v in secrets)
    return {"update": update, "approval": held.json()["approval"]["id"], "secrets": secrets}


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 20) -> Any:
    # htmx replaces elements under the test's feet: a stale one means "look again".
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def click(driver: WebDriver, selector: str) -> None:
    """Click what ``selector`` finds, again if htmx swapped it away under the click."""
    def clicked(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    WebDriverWait(driver, 20, poll_frequency=0.2, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException)).until(clicked)


@pytest.fixture(scope="module")
def sec(browser: Callable[[], WebDriver], stack: Stack, seen: Seen) -> WebDriver:
    """sec, signed in through the OIDC authorization code flow with PKCE."""
    driver = browser()
    driver.get(f"{stack.console}/events")
    wait(driver, lambda d: d.current_url == f"{stack.console}/login")
    seen.keep(driver, "login")
    driver.find_element(By.ID, "oidc-signin").click()
    wait(driver, lambda d: d.current_url.startswith(f"{stack.idp}/authorize?"))
    assert "code_challenge_method=S256" in driver.current_url
    seen.keep(driver, "idp")
    driver.find_element(By.ID, "idp-sec").click()
    wait(driver, lambda d: d.current_url == f"{stack.console}/events")
    assert driver.find_element(By.ID, "whoami").text == "sec"
    assert "via oidc" in driver.find_element(By.CSS_SELECTOR, "header .who").text
    return driver


def test_sec_finds_alices_denied_drop_table_by_filtering_and_sees_its_rule(
    sec: WebDriver, stack: Stack, scenario: dict[str, Any], seen: Seen
) -> None:
    sec.get(f"{stack.console}/events")
    for name, value in (("identity", "alice"), ("decision", "deny"), ("table", "orders"),
                        ("rule", "destructive_ddl")):
        sec.find_element(By.NAME, name).send_keys(value)

    def found(driver: WebDriver) -> Any:
        if driver.find_elements(By.CSS_SELECTOR, "form.htmx-request"):
            return None  # an answer is on its way
        texts = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#results tr.event")]
        # The page opened unfiltered (its rows are everyone's), and the event may not be
        # indexed yet: apply the filters until their answer holds it.
        applied = "identity=alice" in driver.current_url
        if not applied or not any("DROP TABLE orders" in t for t in texts):
            driver.find_element(By.ID, "apply-filters").click()
            return None
        return texts

    texts = wait(sec, found)
    assert all("alice" in t and "deny" in t for t in texts)
    # htmx swapped the results in and pushed the filters into the address.
    assert "identity=alice" in sec.current_url and "rule=destructive_ddl" in sec.current_url
    seen.keep(sec, "timeline")
    click(sec, "#results tr.event a.event-link")
    wait(sec, lambda d: "/events/" in d.current_url and d.find_elements(By.ID, "reasons"))
    rules = [e.text for e in sec.find_elements(By.CSS_SELECTOR, "#reasons code.rule")]
    assert "destructive_ddl" in rules
    assert sec.find_element(By.ID, "outcome").text.startswith("deny")
    assert sec.find_element(By.ID, "sql").text == "DROP TABLE orders"
    assert sec.find_element(By.ID, "verification").text.startswith("ok")
    seen.keep(sec, "event")


def test_sec_approves_danas_update_which_then_runs_and_the_inbox_updates_live(
    sec: WebDriver, stack: Stack, scenario: dict[str, Any], seen: Seen
) -> None:
    approval = scenario["approval"]
    sec.get(f"{stack.console}/approvals")
    # The inbox is swapped every 3 s: read it inside the wait (a swapped row is stale),
    # until the index holds the request's decision (its facts show beside it).
    text = wait(sec, lambda d: next((r.text for r in d.find_elements(
        By.CSS_SELECTOR, "#inbox tr.pending") if r.get_attribute("data-requester") == "dana"
        and "update" in r.text), None))
    assert "UPDATE customers SET country = $1 WHERE id = $2" in text
    assert "need an approval" in text  # the reason policy gave
    assert "update" in text  # the facts of its decision, from the index
    seen.keep(sec, "approvals")

    # Live: a request made while the inbox is open appears without a reload.
    second = stack.query("dana", scenario["update"], [SECOND_PARAM, 8])
    assert second.status_code == 202, second.text
    scenario["second"] = second.json()["approval"]["id"]
    wait(sec, lambda d: d.find_elements(By.CSS_SELECTOR, f'#inbox a[href="/approvals/{scenario["second"]}"]'))

    click(sec, f'#inbox a[href="/approvals/{approval}"]')
    wait(sec, lambda d: d.find_elements(By.ID, "approve"))
    assert sec.find_element(By.ID, "status").text == "pending"
    seen.keep(sec, "approval")
    sec.find_element(By.ID, "comment").send_keys("ok for the migration")
    sec.find_element(By.ID, "approve").click()
    wait(sec, lambda d: d.find_elements(By.ID, "decided") or d.find_elements(By.ID, "error-code"))
    assert not sec.find_elements(By.ID, "error-code"), sec.find_element(By.TAG_NAME, "main").text
    assert "approved" in sec.find_element(By.ID, "decided").text
    assert sec.find_element(By.ID, "status").text == "approved"
    seen.keep(sec, "approval-approved", shot=False)

    ran = stack.query("dana", scenario["update"], [PARAM, 7], approval_id=approval)
    assert ran.status_code == 200, ran.text
    assert ran.json()["rows_affected"] == 1
    check = stack.query("pat", "SELECT country FROM customers WHERE id = $1", [7])
    assert check.json()["rows"] == [[PARAM]]


def _cookie(driver: WebDriver) -> dict[str, str]:
    return {c["name"]: c["value"] for c in driver.get_cookies()}


def test_a_forged_form_post_without_the_csrf_token_is_refused(
    sec: WebDriver, stack: Stack, scenario: dict[str, Any], seen: Seen
) -> None:
    second = scenario["second"]
    sec.get(f"{stack.console}/approvals/{second}")
    wait(sec, lambda d: d.find_elements(By.ID, "approve"))
    csrf = sec.find_element(By.NAME, "csrf").get_attribute("value")
    assert csrf
    # The browser posts a form that has everything but the token, with sec's session.
    sec.execute_script(
        "const f = document.createElement('form'); f.method = 'post';"
        "f.action = arguments[0]; const c = document.createElement('input');"
        "c.name = 'comment'; c.value = 'forged'; f.appendChild(c);"
        "document.body.appendChild(f); f.submit();",
        f"/approvals/{second}/approve",
    )
    wait(sec, lambda d: d.find_elements(By.ID, "error-code"))
    assert sec.find_element(By.ID, "error-code").text == "csrf_failed"
    seen.keep(sec, "csrf-refused", shot=False)
    # The same from outside the browser: no token, a wrong one, another origin.
    cookies = _cookie(sec)
    url = f"{stack.console}/approvals/{second}/approve"
    with httpx.Client(cookies=cookies, follow_redirects=False) as client:
        for form, headers in (({"comment": "x"}, {}), ({"csrf": "nope"}, {}),
                              ({"csrf": csrf}, {"origin": "http://evil.example"})):
            refused = client.post(url, data=form, headers=headers)
            assert refused.status_code == 403 and "csrf_failed" in refused.text
    status = stack.client.get(f"{stack.gateway}/v1/approvals/{second}",
                              headers={"authorization": f"Bearer {stack.tokens['dana']}"})
    assert status.json()["approval"]["status"] == "pending"


def test_the_gateways_rules_hold_through_the_console_no_self_approval(
    browser: Callable[[], WebDriver], stack: Stack, scenario: dict[str, Any], seen: Seen
) -> None:
    dana = browser()
    dana.get(f"{stack.console}/login")
    dana.find_element(By.ID, "dev-dana").click()
    wait(dana, lambda d: d.current_url == f"{stack.console}/events")
    # Her own request is not in her inbox (dba is an approver group, she is the requester)…
    dana.get(f"{stack.console}/approvals")
    wait(dana, lambda d: "Nothing is waiting" in d.find_element(By.ID, "inbox").text)
    # …and deciding it anyway goes to the gateway, which refuses with its own code.
    dana.get(f"{stack.console}/approvals/{scenario['second']}")
    dana.find_element(By.ID, "approve").click()
    wait(dana, lambda d: d.find_elements(By.ID, "error-code"))
    assert dana.find_element(By.ID, "error-code").text == "self_approval"
    seen.keep(dana, "self-approval-refused", shot=False)


def test_touch_and_chain_health_pages(sec: WebDriver, stack: Stack, seen: Seen) -> None:
    sec.get(f"{stack.console}/touch?identity=alice")
    tables = sec.find_element(By.ID, "tables_read").text
    assert "public.customers" in tables
    masked = sec.find_element(By.ID, "masked_columns").text
    assert "public.customers.ssn" in masked and "public.customers.email" in masked
    assert "destructive_ddl" in sec.find_element(By.ID, "denials").text
    seen.keep(sec, "touch")
    with httpx.Client(cookies=_cookie(sec)) as client:
        exported = client.get(f"{stack.console}/touch.json", params={"identity": "alice"})
        assert exported.status_code == 200
        report = exported.json()
        assert any(m["name"] == "public.customers.ssn" for m in report["masked_columns"])
        assert any(d["rule"] == "destructive_ddl" for d in report["denials_by_rule"])
        csv_text = client.get(f"{stack.console}/touch.csv", params={"identity": "alice"}).text
        assert "alice,denials_by_rule,destructive_ddl," in csv_text
        seen.pages["touch.json"], seen.pages["touch.csv"] = exported.text, csv_text
    sec.get(f"{stack.console}/health")
    row = sec.find_element(By.CSS_SELECTOR, "table.chains tbody tr")
    assert "ok" in row.get_attribute("class")
    seen.keep(sec, "health")


def test_alice_signs_in_with_the_dev_sign_in_and_sees_only_her_own_events(
    browser: Callable[[], WebDriver], sec: WebDriver, stack: Stack, seen: Seen
) -> None:
    # A page of one of dana's events, as sec sees it.
    sec.get(f"{stack.console}/events?identity=dana&type=decision")
    danas = wait(sec, lambda d: d.find_elements(By.CSS_SELECTOR, "#results a.event-link"))
    dana_event = danas[0].get_attribute("href")

    alice = browser()
    alice.get(f"{stack.console}/login")
    alice.find_element(By.ID, "dev-alice").click()
    wait(alice, lambda d: d.current_url == f"{stack.console}/events")
    assert alice.find_element(By.ID, "whoami").text == "alice"
    rows = alice.find_elements(By.CSS_SELECTOR, "#results tr.event")
    assert len(rows) >= 3  # her denial, her read and its execution
    identities = {r.find_elements(By.TAG_NAME, "td")[2].text for r in rows}
    assert identities == {"alice"}, identities
    seen.keep(alice, "alice-timeline")
    # Asking for someone else's events gives nothing, not an error.
    alice.get(f"{stack.console}/events?identity=dana")
    assert not alice.find_elements(By.CSS_SELECTOR, "#results tr.event")
    alice.get(dana_event)
    assert alice.find_element(By.ID, "error-code").text == "event_not_found"
    alice.get(f"{stack.console}/health")
    assert alice.find_element(By.ID, "error-code").text == "console_denied"
    alice.get(f"{stack.console}/touch?identity=dana")
    assert "none" in alice.find_element(By.ID, "tables_written").text
    seen.keep(alice, "alice-touch-dana", shot=False)
    alice.get(f"{stack.console}/approvals")
    wait(alice, lambda d: "Nothing is waiting" in d.find_element(By.ID, "inbox").text)


def test_bad_input_gets_a_stable_error_page(sec: WebDriver, stack: Stack) -> None:
    for path, code in (("/events?cursor=garbage", "invalid_cursor"),
                       ("/events?since=yesterday", "invalid_filter"),
                       ("/events?channel=smoke", "invalid_filter"),
                       ("/events/x/y/notanumber", "invalid_request"),
                       ("/events/x/y/99999999999999999999", "invalid_request"),
                       ("/events/x/y/0", "invalid_request"),
                       ("/approvals/not-a-uuid", "invalid_request"),
                       ("/nowhere", "not_found")):
        sec.get(stack.console + path)
        assert sec.find_element(By.ID, "error-code").text == code, path
        assert "Traceback" not in sec.page_source


def test_no_masked_or_parameter_value_appears_on_any_page(
    seen: Seen, scenario: dict[str, Any]
) -> None:
    assert len(seen.pages) >= 12
    for page, html in seen.pages.items():
        for secret in scenario["secrets"]:
            assert secret not in html, f"{secret!r} on {page}"
    # The pages did show the statements, redacted: placeholders and names, no literals.
    assert any(re.search(r"country = \$1 WHERE id = \$2", html) for html in seen.pages.values())


def test_every_page_has_a_strict_content_security_policy(stack: Stack, sec: WebDriver) -> None:
    with httpx.Client(cookies=_cookie(sec)) as client:
        for path in ("/login", "/events", "/approvals", "/touch", "/health"):
            response = client.get(stack.console + path)
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "unsafe" not in csp
            assert "<script>" not in response.text and " style=" not in response.text
    cookie = next(c for c in sec.get_cookies() if c["name"] == "qg_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # Loopback dev only: elsewhere the cookie is __Host- and Secure (tests/unit).
    assert not cookie["secure"]
    logs = [e for e in sec.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not logs, logs


def test_an_edited_event_in_the_trail_shows_as_a_chain_break(
    sec: WebDriver, stack: Stack, seen: Seen
) -> None:
    """Last, as it tampers with the stack's trail: an event appended to the audit file with
    its content edited (its hash no longer fits) is a break, with its instance and seq."""
    import orjson

    from app.audit import canonical

    last = orjson.loads(stack.audit_file.read_bytes().splitlines()[-1])
    forged = {**last, "seq": last["seq"] + 1, "prev_hash": last["hash"],
              "identity": {**(last.get("identity") or {}), "sub": "mallory"}}
    with stack.audit_file.open("ab") as f:
        f.write(canonical(forged) + b"\n")

    def broken(driver: WebDriver) -> Any:
        driver.get(f"{stack.console}/health")
        rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "table.chains tbody tr")
                if r.find_elements(By.TAG_NAME, "td")[0].text == last["instance"]]
        return rows and "broken" in (rows[0].get_attribute("class") or "") and rows[0]

    row = wait(sec, broken)
    assert f"edited at seq {forged['seq']}" in row.text
    cells = row.find_elements(By.TAG_NAME, "td")
    assert cells[4].text == str(last["seq"])  # verified up to the event before it
    seen.keep(sec, "health-break")
    row.find_element(By.PARTIAL_LINK_TEXT, "edited at seq").click()
    wait(sec, lambda d: d.find_elements(By.ID, "verification"))
    assert sec.find_element(By.ID, "verification").text.startswith("edited")
