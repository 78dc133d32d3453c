"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): upload a
reference, type a prompt, generate, and the images appear; on the session's app with bearer-token auth (the page
asks for the token) and on the one without (under a route prefix). See serve_fixtures for the apps.

`scripts/install_test_browser.sh` installs the browser; the test is skipped only when it is absent.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from serve_fixtures import Api, reference_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium / chromedriver not installed: run scripts/install_test_browser.sh (make test does)",
)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One Chromium for the module (it takes seconds to start here); ``browser`` resets it between tests."""
    from selenium import webdriver  # a test dependency (pyproject [test])
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium):
    """The module's Chromium; afterwards the page's storage (the token) is cleared, so no test sees another's."""
    yield chromium
    if chromium.current_url.startswith("http"):
        chromium.execute_script("window.sessionStorage.clear(); window.localStorage.clear();")
    chromium.delete_all_cookies()
    chromium.get("about:blank")


def _type(browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def _status_shows(browser, text: str, timeout: float = 120) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(ec.text_to_be_present_in_element((By.ID, "status"), text))


def _upload(browser, subject: str, reference: Path) -> None:
    from selenium.webdriver.common.by import By

    _type(browser, "subject-id", subject)
    browser.find_element(By.ID, "reference").send_keys(str(reference))
    browser.find_element(By.ID, "upload").click()


def _generate_and_see_the_images(browser) -> None:
    """Generate 2 images (seed 3) for the subject in the form; they appear, decoded by the browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _type(browser, "prompt", "a photo of the subject in the snow")
    for field, value in (("num-images", "2"), ("steps", "2"), ("seed", "3")):
        _type(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.generated")) == 2)
    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img.generated")
    # A real PNG of the model's size, not a broken image icon.
    sizes = [browser.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight];", img) for img in images]
    assert sizes == [[True, 64, 64]] * 2
    assert "seed 3" in browser.find_element(By.ID, "status").text


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.png"
    path.write_bytes(reference_png(5))
    return path


def test_without_auth_upload_generate_and_the_images_appear(open_api: Api, browser, reference):
    """The app without auth, its page under a route prefix (/open/): the API calls go under it too."""
    subject = f"web-{uuid.uuid4().hex[:6]}"
    browser.get(open_api.url + "/")
    assert browser.title == "DreamCache"
    _upload(browser, subject, reference)  # the token field left empty
    _status_shows(browser, f"Subject {subject} ready")
    _generate_and_see_the_images(browser)


def test_with_auth_the_page_asks_for_the_token_then_works(auth_api: Api, browser, reference):
    from selenium.webdriver.common.by import By

    subject = f"web-auth-{uuid.uuid4().hex[:6]}"
    browser.get(auth_api.url + "/")  # the page itself is served without the token
    assert browser.title == "DreamCache"
    _upload(browser, subject, reference)
    _status_shows(browser, "Upload failed (401): this server needs an API token", timeout=60)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert browser.switch_to.active_element == browser.find_element(By.ID, "token")

    _type(browser, "token", "not-the-token")
    browser.find_element(By.ID, "upload").click()
    _status_shows(browser, "Upload failed (401): the API token was refused", timeout=60)

    _type(browser, "token", auth_api.token)
    browser.find_element(By.ID, "upload").click()
    _status_shows(browser, f"Subject {subject} ready")
    _generate_and_see_the_images(browser)

    browser.refresh()  # the token is kept for the tab (sessionStorage)
    assert browser.find_element(By.ID, "token").get_attribute("value") == auth_api.token


def test_the_page_shows_api_errors(open_api: Api, browser):
    from selenium.webdriver.common.by import By

    browser.get(open_api.url + "/")
    _type(browser, "subject-id", "never-uploaded")
    _type(browser, "steps", "2")
    browser.find_element(By.ID, "generate").click()
    _status_shows(browser, "Generation failed (404)", timeout=60)
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery img") == []


def test_picker_thumbnail_progress_and_download_links(open_api: Api, browser, reference):
    """After an upload: the reference's thumbnail, the subject in the picker; a generation with a negative prompt,
    both scales and the guidance mode runs with a progress bar fed by the event stream to its last step, and each
    image has a download link named after subject, prompt and seed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    subject = f"web-pick-{uuid.uuid4().hex[:6]}"
    browser.get(open_api.url + "/")
    _upload(browser, subject, reference)
    _status_shows(browser, f"Subject {subject} ready")
    thumb = browser.find_element(By.ID, "reference-thumb")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", thumb) == 64)
    picker = Select(browser.find_element(By.ID, "subject-picker"))
    WebDriverWait(browser, 30).until(lambda d: subject in [o.get_attribute("value") for o in picker.options])

    _type(browser, "subject-id", "something-else")
    picker.select_by_value(subject)  # picking a subject fills the id field
    assert browser.find_element(By.ID, "subject-id").get_attribute("value") == subject
    _type(browser, "prompt", "a dog in the snow")
    for field, value in (("negative-prompt", "blurry"), ("guidance-scale", "5"), ("image-guidance-scale", "1.5"),
                         ("num-images", "2"), ("steps", "3"), ("seed", "9")):
        _type(browser, field, value)
    Select(browser.find_element(By.ID, "guidance")).select_by_value("joint")
    browser.find_element(By.ID, "generate").click()
    _status_shows(browser, "2 image(s), seed 9")
    progress = browser.find_element(By.ID, "progress")
    assert (progress.get_attribute("value"), progress.get_attribute("max")) == ("3", "3")
    links = browser.find_elements(By.CSS_SELECTOR, "#gallery a.download")
    assert [a.get_attribute("download") for a in links] == [f"{subject}_a-dog-in-the-snow_seed{s}.png" for s in (9, 10)]
    assert all(a.get_attribute("href").startswith("data:image/png;base64,") for a in links)


def test_grid_mode_draws_a_table_cell_by_cell(open_api: Api, browser, reference, tmp_path):
    """Two subjects (one unknown) x two prompts x two seeds: a table of subjects down, prompt x seed across;
    the known subject's cells show images with download links, the unknown one's cells its error."""
    from selenium.webdriver.common.by import By

    subject = f"web-grid-{uuid.uuid4().hex[:6]}"
    browser.get(open_api.url + "/")
    _upload(browser, subject, reference)
    _status_shows(browser, f"Subject {subject} ready")
    browser.find_element(By.ID, "grid-mode").click()
    _type(browser, "grid-subjects", f"{subject}, web-grid-nobody")
    _type(browser, "grid-seeds", "1, 2")
    _type(browser, "prompt", "a photo on a beach\na toy")
    _type(browser, "steps", "2")
    browser.find_element(By.ID, "generate").click()
    _status_shows(browser, "Grid: 8 of 8 cell(s) done, 4 failed")
    rows = browser.find_elements(By.CSS_SELECTOR, "#grid table tr")
    assert len(rows) == 3  # the header and one row per subject
    assert [th.text for th in rows[0].find_elements(By.TAG_NAME, "th")][1:] == [
        "a photo on a beach (seed 1)", "a photo on a beach (seed 2)", "a toy (seed 1)", "a toy (seed 2)"]
    images = rows[1].find_elements(By.CSS_SELECTOR, "td img.generated")
    assert len(images) == 4
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) == 64 for img in images)
    assert rows[1].find_elements(By.CSS_SELECTOR, "a.download")[3].get_attribute("download") == \
        f"{subject}_a-toy_seed2.png"
    failed = rows[2].find_elements(By.CSS_SELECTOR, "td.failed")
    assert len(failed) == 4 and all(cell.text.startswith("404") for cell in failed)
