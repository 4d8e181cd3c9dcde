"""The subtitles page in a real headless Chromium: the spoken sentence appears and goes in step
with the fake MMDAgent-EX, pushed by the server; the page reconnects by itself after the
observer restarts; only the key opens it. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker import config as config_mod
from stages.llm.offline_responder import ChatCompletionServer
from stages.observers.line_breaks import NO_END, NO_START
from stages.observers.subtitles import page_html
from tests import browser
from tests.e2e import Observer, ScriptedLLM, launched, tokens_of

CHROMIUM, WHY_NOT = browser.find()
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SLOW_AVATAR = {"seconds_per_char": 0.1, "min_speech": 0.8}
AVATAR_TEXT = "document.getElementById('avatar').textContent"
CONNECTED = "document.body.dataset.connected || ''"


def wait_until(page: browser.Browser, expression: str, expected, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.eval(expression)
        if value == expected:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{expression} is {page.eval(expression)!r}, not {expected!r} after {timeout} s")


@pytest.mark.skipif(CHROMIUM is None, reason=WHY_NOT)
def test_subtitles_follow_speech_and_survive_an_observer_restart(tmp_path: Path):
    llm = ScriptedLLM()
    server = ChatCompletionServer(llm).start()
    page = None
    try:
        with launched(tmp_path, server=server, avatar_kwargs=SLOW_AVATAR) as world:
            observer = Observer(world, "subtitles").start()
            try:
                url = subprocess.run([sys.executable, "-m", "stages.commands.cli", "observe", "subtitles", "--url"],
                                     env=world.env, capture_output=True, text=True, timeout=30).stdout.strip()
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(url.split("?")[0], timeout=10)
                assert refused.value.code == 403
                page = browser.Browser(CHROMIUM, url)
                wait_until(page, CONNECTED, "yes")
                assert page.eval("getComputedStyle(document.body).backgroundColor") == "rgba(0, 0, 0, 0)"

                # sample what the page shows against what the fake MMDAgent-EX says, every 20 ms
                llm.queue(tokens_of("一文目を話しています。二文目も話します。"))
                world.avatar.send("RECOG_EVENT_START")
                world.avatar.send("RECOG_EVENT_STOP|字幕のテスト")
                samples, shot = [], None
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    speaking = world.avatar.speaking.get("0", "")
                    shown = page.eval(AVATAR_TEXT)
                    samples.append((speaking, shown, world.avatar.speaking.get("0", "")))
                    if shown and shot is None:
                        shot = page.screenshot(ARTIFACTS / "subtitles.png")
                    if world.bus.of("spoken") and not speaking and not shown:
                        break
                    time.sleep(0.02)
                user_shown = page.eval("document.getElementById('user').textContent")

                # the observer restarts: the page comes back by itself and goes on
                observer.stop()
                wait_until(page, CONNECTED, "no")
                observer = Observer(world, "subtitles").start()
                wait_until(page, CONNECTED, "yes", timeout=20)
                llm.queue(tokens_of("再接続しました。"))
                world.avatar.send("RECOG_EVENT_START")
                world.avatar.send("RECOG_EVENT_STOP|もう一度")
                wait_until(page, AVATAR_TEXT, "再接続しました。")
                wait_until(page, AVATAR_TEXT, "")
            finally:
                observer.stop()
    finally:
        if page is not None:
            page.close()
        server.stop()
    assert world.bus.of("spoken"), "the turn was not spoken"
    assert user_shown in ("字幕のテスト", "")
    # each sentence was on the page while it was spoken, and the page never showed one that was not
    for sentence in ("一文目を話しています。", "二文目も話します。"):
        during = [shown for before, shown, after in samples if before == after == sentence]
        assert during and during.count(sentence) >= len(during) - 3, (sentence, during)
    silent = [shown for before, shown, after in samples if before == after == ""]
    assert silent[-1] == "" and samples[-1][1] == ""
    assert all(shown in ("", "一文目を話しています。", "二文目も話します。") for _, shown, _ in samples)
    assert shot is not None and shot.stat().st_size > 1000
    print(f"screenshot kept: {shot}")


# the lines a browser makes of ``text`` in a .line of the page ``width`` wide: characters grouped by
# the top of their box
LINES_JS = """(function (text, width) {
  const el = document.createElement("div");
  el.className = "line"; el.style.width = width; el.style.padding = "0"; el.textContent = text;
  document.body.appendChild(el);
  const node = el.firstChild, lines = [];
  let top = null;
  for (let i = 0; i < node.length; i++) {
    const range = document.createRange(); range.setStart(node, i); range.setEnd(node, i + 1);
    const box = range.getClientRects()[0];
    if (!box) continue;
    if (top === null || box.top > top + box.height / 2) { lines.push(""); top = box.top; }
    lines[lines.length - 1] += node.data[i];
  }
  const overflows = el.scrollWidth > el.clientWidth;
  el.remove();
  return {lines: lines, overflows: overflows};
})(%s, %s)"""

WRAPPED = ("ちょっと待ってね、キャッシュのデータ（3.14）を「しっかり」チェックしよう。円周率は3.14で、財布には1,000円"
           "あります！ショッピングはやっぱりネットで……と言いたい気分です。ミュージック・ビデオ？ええ、そうですよっ。")


@pytest.mark.skipif(CHROMIUM is None, reason=WHY_NOT)
def test_the_page_wraps_by_the_japanese_line_breaking_rules():
    """At every width from 6 to 24 characters: no line of the page starts with a closing mark,
    small kana or ー, none ends with an opening bracket, and a word too long for a line wraps
    instead of being cut off."""
    html = page_html(config_mod.load(Path("/dev/null"))["subtitles"])
    page = browser.Browser(CHROMIUM, "data:text/html;base64," + base64.b64encode(html.encode()).decode())
    try:
        wait_until(page, "document.readyState", "complete")
        widths = [f"{quarter / 4}em" for quarter in range(24, 97)]
        made = {width: page.eval(LINES_JS % (json.dumps(WRAPPED), json.dumps(width))) for width in widths}
        long_word = page.eval(LINES_JS % (json.dumps("https://example.com/" + "a" * 80), json.dumps("6em")))
    finally:
        page.close()
    for width, got in made.items():
        lines = [line.strip() for line in got["lines"]]
        assert "".join(got["lines"]) == WRAPPED and not got["overflows"], (width, lines)
        assert len(lines) >= 5, (width, lines)
        for before, after in zip(lines, lines[1:]):
            assert after[0] not in NO_START and before[-1] not in NO_END, (width, before, after)
    assert len(long_word["lines"]) > 1 and not long_word["overflows"], long_word
