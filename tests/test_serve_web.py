"""The web page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload a reference, type a prompt, generate, and the images appear.

`scripts/install_test_browser.sh` installs the browser; the test is skipped only when it is absent.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from serve_fixtures import Api, reference_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium / chromedriver not installed: run scripts/install_test_browser.sh (make test does)",
)


@pytest.fixture
def page_url(open_api: Api) -> str:
    """The page of the session's app without auth (serve_fixtures)."""
    return open_api.url + "/"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver  # a test dependency (pyproject [test])
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_generate_and_the_images_appear(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    reference = tmp_path / "reference.png"
    reference.write_bytes(reference_png(5))
    subject = f"web-{uuid.uuid4().hex[:6]}"
    wait = WebDriverWait(browser, 120)

    browser.get(page_url)
    assert browser.title == "DreamCache"
    subject_box = browser.find_element(By.ID, "subject-id")
    subject_box.clear()
    subject_box.send_keys(subject)
    browser.find_element(By.ID, "reference").send_keys(str(reference))
    browser.find_element(By.ID, "upload").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), f"Subject {subject} ready"))

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a photo of the subject in the snow")
    for field, value in (("num-images", "2"), ("steps", "2"), ("seed", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.generated")) == 2)

    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img.generated")
    # Decoded by the browser: a real PNG of the model's size, not a broken image icon.
    sizes = [browser.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight];", img) for img in images]
    assert sizes == [[True, 64, 64]] * 2
    assert "seed 3" in browser.find_element(By.ID, "status").text


def test_the_page_shows_api_errors(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    subject_box = browser.find_element(By.ID, "subject-id")
    subject_box.clear()
    subject_box.send_keys("never-uploaded")
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys("2")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "Generation failed (404)"))
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery img") == []
