"""`jaxtag serve`'s page in a real browser: headless Chromium from the system's packages
(Debian's chromium and chromium-driver; `make setup-browser`), driven through ChromeDriver.

The test starts `jaxtag serve` on a free port, uploads a generated clip and checks that the top
tags, the taggram (drawn, with the playhead following the player) and, after a click on the
taggram, the explain figure appear.
With `JAXTAG_SCREENSHOT=PATH` it also saves a screenshot of the page there (what
`make serve-screenshot` does for docs/serving.md, with the demo model:
`JAXTAG_SCREENSHOT_CHECKPOINT`, `JAXTAG_SCREENSHOT_AUDIO`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import jaxtag
from jaxtag import audio
from tests.data_fixtures import write_audio
from tests.serve_process import jaxtag_serve
from tests.tag_fixtures import make_checkpoint

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
        "the browser test needs Debian's chromium and chromium-driver: make setup-browser "
        "(apt-get install -y chromium chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.slow  # a browser, a model compiled three ways (tags, taggram, explain)
def test_the_page_tags_draws_the_taggram_and_explains_a_clicked_chunk(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = os.environ.get("JAXTAG_SCREENSHOT_CHECKPOINT") or make_checkpoint(tmp_path / "m")
    clip = os.environ.get("JAXTAG_SCREENSHOT_AUDIO") or write_audio(
        str(tmp_path / "clip.wav"), 20.0, 330.0, 22_050, seed=3
    )
    tagger = jaxtag.load(checkpoint)
    expected = tagger.tag(clip, top_k=len(tagger.tags))
    wait = WebDriverWait(browser, 120)

    def state() -> str:
        return browser.execute_script("return document.body.dataset.state || ''")

    with jaxtag_serve(checkpoint) as (url, _):
        browser.get(url)
        wait.until(lambda _: state() == "ready")
        assert f"{len(tagger.tags)} tags" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "file").send_keys(os.path.abspath(clip))
        wait.until(lambda _: state() in ("tagged", "error"))
        assert state() == "tagged", browser.find_element(By.ID, "status").text

        # the top tags, best first, with the Python API's scores
        items = browser.find_elements(By.CSS_SELECTOR, "#tags li")
        shown = [(li.get_attribute("data-label"), li.text.split()[-1]) for li in items]
        assert shown == [(t["label"], f"{t['score']:.2f}") for t in expected[: len(items)]]
        assert len(items) == min(10, len(tagger.tags))

        # the taggram: one row per tag, coloured cells (not the white background)
        canvas = browser.find_element(By.ID, "taggram")
        size = browser.execute_script("const c = arguments[0]; return [c.width, c.height];", canvas)
        assert size[1] >= 12 * len(tagger.tags)
        pixel = browser.execute_script(
            "return Array.from(arguments[0].getContext('2d').getImageData(175, 10, 1, 1).data)",
            canvas,
        )
        assert pixel[:3] != [255, 255, 255] and pixel[3] == 255, pixel

        # the playhead follows the player
        before = browser.execute_script("return document.getElementById('playhead').offsetLeft")
        browser.execute_script(
            "const p = document.getElementById('player'); p.currentTime = 10;"
            "p.dispatchEvent(new Event('timeupdate'));"
        )
        after = browser.execute_script("return document.getElementById('playhead').offsetLeft")
        assert after > before + 100, (before, after)

        # a click on the taggram explains that chunk: the figure appears
        ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).click().perform()
        wait.until(lambda _: state() == "explained")
        figure = browser.find_element(By.ID, "maps")
        assert browser.execute_script("return arguments[0].naturalWidth", figure) > 400
        start = float(browser.find_element(By.ID, "chunk-start").text)
        duration = audio.load_audio(clip).size / audio.SAMPLE_RATE
        assert 0.0 <= start <= duration - 4.09
        screenshot = os.environ.get("JAXTAG_SCREENSHOT")
        if screenshot:
            browser.execute_script("window.scrollTo(0, 0)")
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(screenshot)
