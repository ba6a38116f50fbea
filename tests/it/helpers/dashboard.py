"""Drives sqlferry's dashboard in a real headless Chromium, through chromedriver and
Python selenium, as a person would: type a key, read the cards, click.

Usage: dashboard.py URL ADMIN_KEY REPLICA [SCREENSHOT_DIR]

Steps, each waited for on the page with a deadline (never a fixed sleep):
1. a wrong key: the sign-in form shows the server's refusal, and nothing is kept;
2. the admin key: the board lists every replica; REPLICA's card is read;
3. Sync now on REPLICA's card: its result line says how many subscribers it reached;
4. REPLICA's versions open, one row per version.
With SCREENSHOT_DIR, it saves dashboard-login.png (the refused key),
dashboard-desktop.png (1280 px wide, the whole page) and dashboard-phone.png (390 x 844).

Prints one JSON object: what the page showed at each step. A missing chromium,
chromedriver or selenium, or a step that times out, exits non-zero saying which.
"""

import json
import os
import shutil
import sys
import tempfile

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    sys.exit(f"python3 has no selenium ({e}): run .ci/run, or python3 -m pip install selenium")

TIMEOUT_S = 30
WRONG_KEY = "sfk_" + "0" * 64


def need(program):
    path = shutil.which(program)
    if not path:
        sys.exit(f"{program} is missing: run .ci/run, or apt-get install chromium chromium-driver")
    return path


def browser(profile):
    options = webdriver.ChromeOptions()
    options.binary_location = need("chromium")
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(flag)
    # The driver is named, so selenium never looks for (or downloads) one of its own.
    return webdriver.Chrome(options=options, service=Service(executable_path=need("chromedriver")))


def main():
    url, admin_key, replica = sys.argv[1:4]
    shots = sys.argv[4] if len(sys.argv) > 4 else None
    seen = {}
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            run(driver, url, admin_key, replica, shots, seen)
        except TimeoutException:
            body = driver.find_element(By.TAG_NAME, "body").text
            sys.exit(f"timed out at step {seen.get('step')}; the page shows:\n{body}\n"
                     f"seen so far: {json.dumps(seen)}")
        finally:
            driver.quit()
    print(json.dumps(seen))


def shoot(driver, path, width, height, mobile=False):
    """A screenshot of a width x height viewport (height None: the whole page), through
    Chromium's device emulation, so the picture does not depend on window decorations."""
    metrics = {"width": width, "height": height or 900, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    if height is None:
        metrics["height"] = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def visible_text(driver, element_id):
    e = driver.find_element(By.ID, element_id)
    return e.text if e.is_displayed() else ""


def run(driver, url, admin_key, replica, shots, seen):
    wait = WebDriverWait(driver, TIMEOUT_S)
    card_css = f'article.card[data-replica="{replica}"]'

    seen["step"] = "wrong key"
    driver.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "key").is_displayed())
    driver.find_element(By.ID, "key").send_keys(WRONG_KEY)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(lambda d: visible_text(d, "login-error"))
    seen["login_error"] = visible_text(driver, "login-error")
    seen["board_shown_after_wrong_key"] = driver.find_element(By.ID, "board").is_displayed()
    seen["kept_after_wrong_key"] = driver.execute_script(
        "return sessionStorage.getItem('sqlferry.key')")
    if shots:
        shoot(driver, os.path.join(shots, "dashboard-login.png"), 760, 560)

    seen["step"] = "admin key"
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(admin_key)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, card_css))
    card = driver.find_element(By.CSS_SELECTOR, card_css)
    cards = driver.find_elements(By.CSS_SELECTOR, "article.card")
    seen["replicas"] = [c.get_attribute("data-replica") for c in cards]
    seen["healths"] = {c.get_attribute("data-health"): c.find_element(By.CSS_SELECTOR, ".why").text
                       for c in cards if c.get_attribute("data-health") != "fresh"}
    seen["health"] = card.get_attribute("data-health")
    seen["version_count"] = card.find_element(By.CSS_SELECTOR, ".version-count").text
    seen["subscribers"] = card.find_element(By.CSS_SELECTOR, ".subscribers").text
    seen["stored"] = card.find_element(By.CSS_SELECTOR, ".stored").text
    seen["drill"] = card.find_element(By.CSS_SELECTOR, ".drill").text
    seen["followers"] = [li.text for li in card.find_elements(By.CSS_SELECTOR, ".followers li")]
    seen["failing_count"] = driver.find_element(By.ID, "count-failing").text
    seen["login_error_after_sign_in"] = visible_text(driver, "login-error")
    seen["url"] = driver.current_url
    seen["session_key_kept"] = driver.execute_script(
        "return sessionStorage.getItem('sqlferry.key')") == admin_key
    seen["local_storage"] = driver.execute_script(
        "return JSON.stringify(Object.assign({}, localStorage))")

    seen["step"] = "sync now"
    card.find_element(By.CSS_SELECTOR, "button.sync-now").click()
    result = lambda d: d.find_element(By.CSS_SELECTOR, card_css + " .sync-result").text
    wait.until(lambda d: result(d).startswith(("Reached", "No subscriber", "This key", "The server")))
    seen["sync_result"] = result(driver)

    seen["step"] = "versions"
    driver.find_element(By.CSS_SELECTOR, card_css + " button.show-versions").click()
    rows = card_css + " .versions tbody tr"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, rows))
    seen["version_rows"] = [r.get_attribute("data-version")
                            for r in driver.find_elements(By.CSS_SELECTOR, rows)]
    seen["step"] = "done"

    if shots:
        # The whole page at laptop width, then the first screen of a phone.
        shoot(driver, os.path.join(shots, "dashboard-desktop.png"), 1280, None)
        shoot(driver, os.path.join(shots, "dashboard-phone.png"), 390, 844, mobile=True)


if __name__ == "__main__":
    main()
