"""graphite-web's UI on the query host, in a real browser (Debian's headless
Chromium through chromedriver, on the controller): the composer's metric tree
shows a metric the storage hosts hold, clicking it draws its graph, and the
provisioned `carbonscale` dashboard loads with every graph drawn (from the
relays' and carbon-cache's own counters, and query_data.py's samples).

Screenshots go to $CARBONSCALE_ARTIFACTS, else molecule/cluster/artifacts/
(gitignored)."""

import json
import os
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ARTIFACTS = Path(
    os.environ.get("CARBONSCALE_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]

# Pixels of an <img> drawn onto a canvas: how many are coloured (a series'
# line; graphite draws axes, text and "No Data" in white/grey on black).
COLOURED_PIXELS_JS = """
const img = arguments[0];
if (!img.complete || img.naturalWidth === 0) return null;
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth;
canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let coloured = 0;
for (let i = 0; i < data.length; i += 4) {
  const r = data[i], g = data[i + 1], b = data[i + 2];
  if (Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
}
return {width: img.naturalWidth, height: img.naturalHeight, coloured: coloured};
"""


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(
            options=options, service=Service(executable_path="/usr/bin/chromedriver")
        )
        try:
            yield driver
        finally:
            driver.quit()


def _shot(driver, name):
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path


def _drawn(driver, img):
    return driver.execute_script(COLOURED_PIXELS_JS, img)


def _error_dialogs(driver):
    """Titles of ExtJS error windows on screen (graphite's Ext.Msg.alert('Error', ...))."""
    return [
        e.text
        for e in driver.find_elements(By.CSS_SELECTOR, ".x-window .x-window-header-text")
        if e.is_displayed() and "Error" in e.text
    ]


def _tree_node(driver, text):
    return WebDriverWait(driver, 30).until(
        lambda d: d.find_element(
            By.XPATH,
            f"//div[contains(@class, 'x-tree-node-el')]//span[normalize-space(text())='{text}']",
        )
    )


# A double-click event sent to the element itself. A mouse double-click goes to
# where the node was when it was found, and the tree moves while branches load:
# on a loaded machine it once expanded the node above the one meant.
DOUBLE_CLICK_JS = (
    "arguments[0].dispatchEvent(new MouseEvent('dblclick', "
    "{bubbles: true, cancelable: true, view: window}))"
)


def _expand(driver, text):
    """Expand the tree's branch `text` (ExtJS toggles a branch on a double-click)
    and wait until it shows as expanded."""

    def expanded(d):
        node = _tree_node(d, text)
        row = node.find_element(By.XPATH, "./ancestor::div[contains(@class, 'x-tree-node-el')][1]")
        return "x-tree-node-expanded" in (row.get_attribute("class") or "")

    # Each wait looks again when the tree re-renders the row under it (stale).
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
    if not wait.until(lambda d: (expanded(d),))[0]:
        driver.execute_script(DOUBLE_CLICK_JS, _tree_node(driver, text))
    wait.until(expanded)


def test_composer_tree_shows_a_sent_metric_and_clicking_it_draws_the_graph(browser, query_tier):
    browser.get(query_tier.query_url + "/")
    # "/" is graphite's frameset: a header and the composer in frame "content".
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "frame#composerFrame")
    )
    browser.switch_to.frame("content")
    try:
        for branch in ("Metrics", "lab", "query"):
            _expand(browser, branch)
        leaf = _tree_node(browser, "probe")
        leaf.click()
        viewer = browser.find_element(By.ID, "image-viewer")
        WebDriverWait(browser, 30).until(
            lambda d: (
                "lab.query.probe" in (viewer.get_attribute("src") or "")
                and (_drawn(d, viewer) or {}).get("coloured", 0) > 0
            )
        )
        drawn = _drawn(browser, viewer)
        assert _error_dialogs(browser) == []
    finally:
        browser.switch_to.default_content()
        _shot(browser, "composer")
    print(f"composer graph: {drawn}")
    assert drawn["width"] > 100 and drawn["height"] > 100
    # The series' line is coloured; axes, labels and "No Data" are not.
    assert drawn["coloured"] >= 50, drawn


def test_carbonscale_dashboard_draws_every_graph(browser, cluster, query_tier):
    host = cluster.host(query_tier.query)
    spec = host.file("/etc/graphite/dashboards/carbonscale.json").content_string
    spec = json.loads(spec)
    graphs = spec["graphs"]
    browser.get(query_tier.query_url + "/dashboard/carbonscale")

    def all_drawn(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "img.graph-img")
        if len(images) != len(graphs):
            return False
        results = [_drawn(driver, img) for img in images]
        return results if all(r and r["coloured"] > 0 for r in results) else False

    try:
        # Until every image has loaded and has its line (they load one by one,
        # and the dashboard replaces an image element when it redraws it).
        results = WebDriverWait(
            browser, 60, ignored_exceptions=(StaleElementReferenceException,)
        ).until(all_drawn)
    finally:
        _shot(browser, "dashboard-carbonscale")
    assert _error_dialogs(browser) == []
    titles = [graph["title"] for graph in graphs]
    for title, result in zip(titles, results, strict=True):
        print(f"dashboard graph {title!r}: {result}")
    assert browser.title == "carbonscale - Graphite Dashboard"
    for title, result in zip(titles, results, strict=True):
        assert (result["width"], result["height"]) == (spec["width"], spec["height"]), title
        assert result["coloured"] >= 50, (title, result)
