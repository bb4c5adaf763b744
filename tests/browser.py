"""A page opened from disk in a real headless browser (Chromium via Playwright).

`open_page(path, screenshot=...)` loads `file://<path>` in headless Chromium
and returns what a reader would meet: the console errors and uncaught page
errors, the failed requests, and for every `<img>` whether it decoded and its
natural size. It skips the calling test, saying why, where Playwright or a
Chromium is missing (`.ci/run` installs both; Debian's package `chromium`
gives `/usr/bin/chromium`, or set `CCO_CHROMIUM` to another executable).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import shutil

import pytest

# Chromium as root in a container, with no network: no sandbox, no GPU, and
# none of its background connections (refused here, many at a time).
_ARGS = (
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
)


@dataclasses.dataclass
class Opened:
  title: str
  console_errors: list[str]
  page_errors: list[str]
  failed_requests: list[str]
  # One per <img>: (alt or src prefix, decoded, natural width, natural height).
  images: list[tuple[str, bool, int, int]]
  tables: int


def chromium() -> str | None:
  found = os.environ.get('CCO_CHROMIUM') or shutil.which('chromium')
  return found or shutil.which('chromium-browser')


def open_page(path: Path, *, screenshot: Path | None = None) -> Opened:
  sync_api = pytest.importorskip(
    'playwright.sync_api', reason='playwright is not installed'
  )
  executable = chromium()
  if executable is None:
    pytest.skip('no Chromium (apt-get install chromium, or set CCO_CHROMIUM)')
  console, page_errors, failed = [], [], []
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(
      executable_path=executable, headless=True, args=list(_ARGS)
    )
    try:
      page = browser.new_page(viewport={'width': 1280, 'height': 900})
      page.on(
        'console',
        lambda m: console.append(m.text) if m.type == 'error' else None,
      )
      page.on('pageerror', lambda e: page_errors.append(str(e)))
      page.on('requestfailed', lambda r: failed.append(r.url[:120]))
      page.goto(Path(path).resolve().as_uri(), wait_until='load')
      images = page.evaluate(
        """() => Array.from(document.images).map(i => [
             i.alt || i.src.slice(0, 40), i.complete && i.naturalWidth > 0,
             i.naturalWidth, i.naturalHeight])"""
      )
      tables = page.evaluate('() => document.querySelectorAll("table").length')
      if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
      title = page.title()
    finally:
      browser.close()
  return Opened(
    title=title,
    console_errors=console,
    page_errors=page_errors,
    failed_requests=failed,
    images=[tuple(i) for i in images],
    tables=tables,
  )


def assert_reads_well(opened: Opened, *, min_images: int) -> None:
  """Loaded without an error, and every image decoded with a real size."""
  assert not opened.console_errors, opened.console_errors
  assert not opened.page_errors, opened.page_errors
  assert not opened.failed_requests, opened.failed_requests
  assert len(opened.images) >= min_images, opened.images
  broken = [i for i in opened.images if not i[1] or min(i[2], i[3]) < 50]
  assert not broken, broken
