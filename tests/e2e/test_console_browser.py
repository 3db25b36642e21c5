"""The console in a real browser: Debian's chromium, headless, driven by Playwright
(pointed at /usr/bin/chromium; no browser is downloaded).

One walk, as a reviewer and an auditor do it, over real parts: the demo dataset trained,
the processing flow served by Prefect, the API as ``erasure serve``. A request reaches
review by itself; the reviewer signs in, finds it, sees both texts, clicks Erase and
Keep, and watches it complete; then downloads the certificate and verifies it. A
reviewer cannot open the audit pages, and a form posted without its CSRF token is
refused. Screenshots of every page at 1280x800 and 390 px wide go to the test's temp
dir (``screenshots/``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from db.requests import issue_token
from db.session import unit_of_work
from pipeline.certificate import parse_envelope, verify_certificate
from pipeline.database import open_database
from tests.integration.test_service_runs_itself import _env, served_deployment
from tests.prefect_server import api_server, trained_demo

CHROMIUM = os.environ.get("ERASURE_TEST_CHROMIUM", "/usr/bin/chromium")
COMPLETION_TIMEOUT_S = 240
WIDE, NARROW = {"width": 1280, "height": 800}, {"width": 390, "height": 844}

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def _browser(playwright):  # noqa: ANN001, ANN202
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(f"chromium is required for the console's browser tests ({CHROMIUM}): "
                    "apt-get install -y chromium (bash infra/run.sh test does it)")
    return playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                      headless=True, args=["--no-sandbox"])


def _tokens(settings) -> dict[str, str]:  # noqa: ANN001
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return {scope: issue_token(session, f"{scope}-person", [scope])[0]
                    for scope in ("intake", "review", "audit")}
    finally:
        engine.dispose()


def _other_peoples_texts(demo: dict, count: int) -> list[str]:
    """Texts of records that are not the subject's: reached only from the sample, so reviewed."""
    subject, texts = demo["subject"], []
    for line in Path(demo["files"].records).read_text().splitlines():
        record = json.loads(line)
        if record.get("email") not in (None, subject["email"]) and record["id"] not in subject["copies"]:
            texts.append(record["text"])
            if len(texts) == count:
                return texts
    raise AssertionError("not enough other records")


def _edited(text: str) -> str:
    """A near-copy: two words changed, so some of its 5-word runs are shared and some are not."""
    words = text.split()
    for at in (len(words) // 3, 2 * len(words) // 3):
        words[at] = "indeed"
    return " ".join(words)


def _shoot(page, folder: Path, name: str) -> None:  # noqa: ANN001
    """The page at 1280x800 (full length) and at 390 px wide."""
    page.set_viewport_size(WIDE)
    page.screenshot(path=str(folder / f"{name}-1280.png"), full_page=True)
    page.set_viewport_size(NARROW)
    page.screenshot(path=str(folder / f"{name}-390.png"), full_page=True)
    # usable at 390 px: nothing wider than the screen but the tables' own scroll boxes
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= NARROW["width"] + 1, f"{name} is {overflow} px wide at 390 px"
    page.set_viewport_size(WIDE)


def _sign_in(page, base: str, token: str) -> None:  # noqa: ANN001
    page.goto(f"{base}/console")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/console/requests*")


def test_a_reviewer_decides_in_the_browser_and_the_request_completes(settings, prefect_env, tmp_path) -> None:  # noqa: ANN001
    from playwright.sync_api import sync_playwright

    demo = trained_demo(settings, records=300, shards=2, slices=2)
    tokens = _tokens(settings)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = _env(settings, prefect_env)
    serve_log = tmp_path / "serve.log"
    with served_deployment(env, serve_log), api_server(env, tmp_path / "api.log") as base:
        answer = httpx.post(f"{base}/v1/erasure-requests", timeout=30,
                            json={"identifiers": [{"kind": "email", "value": demo["subject"]["email"]}],
                                  "samples": [_edited(text) for text in _other_peoples_texts(demo, 2)]},
                            headers={"Authorization": f"Bearer {tokens['intake']}", "Idempotency-Key": "console"})
        assert answer.status_code == 202, answer.text
        request_id = answer.json()["id"]
        with sync_playwright() as playwright:
            browser = _browser(playwright)
            page = browser.new_page(viewport=WIDE, accept_downloads=True)
            page.goto(f"{base}/console/requests")  # no session: sent to sign in
            assert "/console/sign-in" in page.url
            _shoot(page, shots, "sign-in")
            _sign_in(page, base, tokens["review"])

            # the request reaches review by itself; the table marks it
            row = page.locator(f"tr.needs-review:has(a[href='/console/requests/{request_id}'])")
            deadline = time.monotonic() + COMPLETION_TIMEOUT_S
            while row.count() == 0:
                assert time.monotonic() < deadline, serve_log.read_text(errors="replace")[-3000:]
                time.sleep(1)
                page.reload()
            _shoot(page, shots, "requests")
            row.locator("a").first.click()
            page.wait_for_url(f"{base}/console/requests/{request_id}")

            # both texts side by side, shared words highlighted, both scores shown
            items = page.locator("#review article.match")
            assert items.count() >= 2, page.content()[-3000:]
            first = items.nth(0)
            assert first.locator("blockquote.query").inner_text().strip()
            assert first.locator("blockquote.record").inner_text().strip()
            # the shared runs are highlighted, the changed words are not
            assert first.locator("blockquote.record mark").count() >= 2
            marked = "".join(first.locator("blockquote.query mark").all_inner_texts())
            assert "indeed" not in marked and len(marked) < len(first.locator("blockquote.query").inner_text())
            assert "Jaccard" in first.inner_text() and "cosine" in first.inner_text()
            _shoot(page, shots, "review")
            # an auditor reads the same page without the texts and without the buttons
            auditor = browser.new_page(viewport=WIDE)
            _sign_in(auditor, base, tokens["audit"])
            auditor.goto(f"{base}/console/requests/{request_id}")
            assert auditor.locator("#review article.match").count() == items.count()
            assert auditor.locator("blockquote").count() == 0 and auditor.locator("#review button").count() == 0
            assert "shown to reviewers only" in auditor.inner_text("#review")
            auditor.close()
            page.locator("#review").screenshot(path=str(shots / "review-queue-1280.png"))  # the README's picture

            # a form posted without its CSRF token is refused (the browser posts the form as it is)
            page.evaluate("document.querySelector('#deadline form input[name=csrf]').remove()")
            page.locator("#deadline form").first.locator("textarea").fill("needs another month")
            with page.expect_response(lambda r: r.url.endswith("/extension")) as refused:
                page.locator("#deadline form").first.locator("button").click()
            assert refused.value.status == 403 and "CSRF" in page.inner_text("main")
            page.goto(f"{base}/console/requests/{request_id}")

            # Erase one match, Keep another, then decide the rest (Erase) until none waits
            page.locator("#review article.match").nth(0).locator("button.btn-erase").click()
            page.wait_for_load_state()
            page.locator("#review article.match").nth(1).locator("button.btn-keep").click()
            page.wait_for_load_state()
            while page.locator("#review article.match:not(.decided) button.btn-erase").count():
                page.locator("#review article.match:not(.decided) button.btn-erase").first.click()
                page.wait_for_load_state()
            verdicts = page.locator("#review .verdict").all_inner_texts()
            assert "decided: erase" in verdicts and "decided: keep" in verdicts

            # the request moves on by itself; the page refreshes while it is processed
            deadline = time.monotonic() + COMPLETION_TIMEOUT_S
            # completed first, then the certificate is issued
            while (page.locator(".summary .state").inner_text().strip() != "completed"
                   or page.locator("#certificate-verdict").count() == 0):
                assert time.monotonic() < deadline, serve_log.read_text(errors="replace")[-3000:]
                assert page.locator(".summary .state").inner_text().strip() != "failed", serve_log.read_text()[-3000:]
                time.sleep(2)
                page.reload()
            assert "Signature verified" in page.inner_text("#certificate-verdict")
            assert "Output suppression" in page.inner_text("#certificate")
            assert page.locator("blockquote").count() == 0  # closed: ids and counts only, no texts
            with page.expect_download() as download:
                page.click("#certificate-download")
            saved = tmp_path / "certificate.json"
            download.value.save_as(saved)
            verdict = verify_certificate(parse_envelope(saved.read_text()))
            assert verdict.valid and verdict.request_id == request_id
            _shoot(page, shots, "completed")

            page.goto(f"{base}/console/datasets")
            _shoot(page, shots, "datasets")
            assert page.locator("svg.lineage").count() == 1
            # a reviewer cannot open the audit pages
            assert page.goto(f"{base}/console/audit").status == 403
            page.locator("form.signout button").click()
            page.wait_for_url(f"{base}/console/sign-in*")

            _sign_in(page, base, tokens["audit"])
            assert page.goto(f"{base}/console/audit").status == 200
            page.click("#chain button")
            assert "Intact" in page.inner_text("#chain-result")
            page.fill("input[name=value0]", demo["subject"]["email"])
            page.click("#subject button")
            assert request_id[:8] in page.inner_text("#subject-result")
            assert demo["subject"]["email"] not in page.url and demo["subject"]["email"] not in page.content()
            _shoot(page, shots, "audit")
            page.goto(f"{base}/console/requests/{request_id}")  # an auditor reads it; no texts, no buttons
            assert page.locator("button.btn-erase").count() == 0
            browser.close()
