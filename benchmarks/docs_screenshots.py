"""Looks at every page of the built docs site as a reader would: headless Chromium at 1280 px.

    mkdocs build --strict -d /tmp/site
    pip install playwright            # in any environment; the browser is Debian's chromium
    python benchmarks/docs_screenshots.py /tmp/site --out /tmp/shots

Writes one full-page PNG per page and prints, per page, what a reader would trip over: a code
block, table or figure wider than its column (horizontal scrolling), a figure scaled below 60%
of its own width (unreadable labels) unless it links to
itself at full size, inline code in a table cell broken across lines. Exits 1
when any page has one. Not part of the test suite (CI has no browser); run it after changing docs.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import sys
import threading

CHECK = r"""() => {
  const out = [];
  document.querySelectorAll('pre > code').forEach((el, i) => {
    if (el.scrollWidth > el.clientWidth + 1)
      out.push(`code block ${i + 1} scrolls (${el.scrollWidth} > ${el.clientWidth} px)`);
  });
  document.querySelectorAll('.md-typeset__scrollwrap').forEach((el) => {
    const head = Array.from(el.querySelectorAll('th')).slice(0, 3).map((th) => th.textContent).join(' | ');
    if (el.scrollWidth > el.clientWidth + 1)
      out.push(`table "${head}" scrolls (${el.scrollWidth} > ${el.clientWidth} px)`);
  });
  document.querySelectorAll('.md-content img').forEach((el) => {
    const linked = el.closest('a') && el.closest('a').getAttribute('href') === el.getAttribute('src');
    if (el.naturalWidth && el.clientWidth < 0.6 * el.naturalWidth && !linked)
      out.push(`figure ${el.getAttribute('src')} shown at ` +
               `${Math.round(100 * el.clientWidth / el.naturalWidth)}% of its width`);
  });
  document.querySelectorAll('td code, th code').forEach((el) => {
    const rects = el.getClientRects();
    if (rects.length > 1 && !/\s/.test(el.textContent)) out.push(`table code '${el.textContent}' broken mid-word`);
  });
  return out;
}"""


def pages(site: pathlib.Path) -> list:
    """Every page of the site: its index.html files, as URL paths."""
    found = []
    for f in sorted(site.rglob("index.html")):
        rel = f.parent.relative_to(site).as_posix()
        if rel.startswith(("assets", "search")):
            continue
        found.append("" if rel == "." else rel + "/")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("site", type=pathlib.Path, help="the built site (mkdocs build -d SITE)")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs_screenshots"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:  # (one line per file otherwise)
            pass

    handler = functools.partial(Quiet, directory=str(args.site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    problems = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        for rel in pages(args.site):
            page.goto(base + rel, wait_until="load")
            name = (rel.strip("/").replace("/", "_") or "index") + ".png"
            page.screenshot(path=str(args.out / name), full_page=True)
            found = page.evaluate(CHECK)
            problems += len(found)
            print(f"{rel or '/':24s} {args.out / name}" + ("" if not found else "\n  " + "\n  ".join(found)))
        browser.close()
    httpd.shutdown()
    print(f"{problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
