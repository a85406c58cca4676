"""A real browser (headless Chromium through chromedriver): the report opens with its figures, and the served page
classifies a review as /predict does. Screenshots go to each test's tmp folder."""

import shutil

import pytest

from helpers import server_process

webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")
BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="needs chromium and chromium-driver (apt-get)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # a given driver: nothing is downloaded
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_report_opens_with_its_figures_and_tables(trained, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get((trained["out"] / "report.html").as_uri())
    shown = {key: browser.find_element(By.ID, key) for key in ("metrics", "confusion", "per-class", "reliability",
                                                               "pr", "roc", "mistakes")}
    assert all(element.is_displayed() and element.size["height"] > 40 for element in shown.values())
    for key in ("reliability", "pr", "roc"):  # drawn: the browser laid out a line with a real length
        line = shown[key].find_elements(By.CSS_SELECTOR, "polyline")[-1]
        assert browser.execute_script("return arguments[0].getTotalLength()", line) > 100
    cells = [c.text for c in shown["metrics"].find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "accuracy" and float(cells[1]) == trained["metrics"]["eval_accuracy"]
    browser.save_screenshot(str(tmp_path / "report.png"))


def test_the_served_page_classifies_a_review_as_predict_does(exported, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    review = "the movie was great and wonderful , i loved it"
    with server_process("predict_sentiment.py", exported, "--runtime", "onnx", "--api-key", "s3cret") as (url, _):
        browser.get(url + "/")
        browser.find_element(By.ID, "text").send_keys(review)
        browser.find_element(By.ID, "send").click()  # no key yet: the page shows the server's 401
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text.startswith("401: send the API key")
        browser.find_element(By.ID, "key").send_keys("s3cret")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "decision").text not in ("", "..."))
        decision = browser.find_element(By.ID, "decision").text
        bars = browser.find_elements(By.CSS_SELECTOR, "#scores .row")
        answer = httpx.post(url + "/predict", json={"texts": [review]}, timeout=10,
                            headers={"Authorization": "Bearer s3cret"}).json()["predictions"][0]
        browser.save_screenshot(str(tmp_path / "page.png"))
    assert decision == f"{answer['label']} ({answer['score']:.2f})"
    assert {bar.get_attribute("data-label") for bar in bars} == set(answer["scores"])
    assert browser.find_element(By.ID, "error").text == ""
