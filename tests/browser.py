"""Browser and HTTP helpers of the dashboard tests: headless Chromium through Selenium with
Debian's system driver (`apt-get install chromium chromium-driver`; `.ci/run` installs them), and
a GET that sends a path exactly as written."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NO_BROWSER = (
    "Chromium not installed (/usr/bin/chromium, /usr/bin/chromedriver): "
    "`apt-get install -y chromium chromium-driver` (.ci/run does it)"
)


def headless_chromium() -> Any:
    """Headless Chromium through Selenium with the system driver (no download); None without
    Chromium. The caller quits it."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return None
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (dev extra)"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def get(
    base: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, str]:
    """GET ``path`` from ``base`` (``http[s]://HOST:PORT``) exactly as written (no URL
    normalisation): (status, body)."""
    host, port = base.split("://")[1].rsplit(":", 1)
    conn = (
        http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        if base.startswith("https")
        else http.client.HTTPConnection(host, int(port), timeout=10)
    )
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    conn.close()
    return response.status, body
