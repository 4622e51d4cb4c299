"""The page at ``/`` in a real browser: headless Chromium driven by Selenium (Debian's
``chromium`` and ``chromium-driver``; ``.ci/run`` installs them where apt-get can). It loads,
an uploaded photo yields one map per head of the model (3) plus the mean map and the mask, all
decoded images, and moving the threshold slider asks for new masks. Skipped, with the reason,
where no browser or driver is installed."""
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests._serve import CAT, running_server, tiny_export  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
HEADS = 3  # tiny_export's vit_tiny


@pytest.fixture(scope="module")
def browser():
    binary = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no Chromium and chromedriver here (apt-get install -y chromium "
                    "chromium-driver; .ci/run does it where apt-get works)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    model = tiny_export(tmp_path_factory.mktemp("page") / "tiny.onnx")
    with running_server(model) as (_, port):
        yield f"http://127.0.0.1:{port}/"


def decoded(driver, css: str) -> list[bool]:
    """For each image matching ``css``: whether it holds a decoded picture."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map("
        "(img) => img.complete && img.naturalWidth > 0)", css)


def test_page_shows_each_head_the_mean_and_the_mask(browser, page_url):
    browser.get(page_url)
    assert browser.title == "dino_fast attention maps"
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "3 heads" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(CAT))
    wait.until(lambda d: d.find_element(By.ID, "results").is_displayed())
    assert "error" not in browser.find_element(By.ID, "status").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.head-map")) == HEADS
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.head-mask")) == HEADS
    wait.until(lambda d: all(decoded(d, "#results img")))
    assert len(decoded(browser, "#results img")) == 3 + 2 * HEADS

    old_mask = browser.find_element(By.ID, "mask").get_attribute("src")
    browser.execute_script("const s = document.getElementById('threshold'); s.value = 0.2;"
                           "s.dispatchEvent(new Event('change'));")
    wait.until(lambda d: "20%" in d.find_element(By.ID, "mask-caption").text)
    assert browser.find_element(By.ID, "mask").get_attribute("src") != old_mask
