"""The control API, ``mmdagent-llm input api``: a real process on the bus of the real pipeline with
the simulated MMDAgent-EX, asked over HTTP by urllib and curl; its events read by ``curl -N`` and
by a page in a real headless Chromium. Hostile requests reach nothing; ``|`` and line breaks
never reach MMDAgent-EX raw; a bridge that does not answer is a 504; the API stops at once with
requests and event streams open. One world for all of it
(its steps are the helpers below); the checks of a request's shape need no process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from broker import config as config_mod
from broker import wire
from stages.inputs.api import conversation_event, fields_of, openapi, voice_tags
from stages.llm.offline_responder import ChatCompletionServer
from stages.observers import web
from stages.observers.web import Refused
from tests import browser
from tests.e2e import Observer, ScriptedLLM, World, launched
from tests.test_restart import pid_of
from tests.test_subtitles import wait_until

CHROMIUM, NO_CHROMIUM = browser.find()
CURL = shutil.which("curl")
AVATAR = {"seconds_per_char": 0.02, "min_speech": 0.2, "stop_delay": 0.2, "cut_delay": 0.2}
WAIT = 15.0
ANSWER_TIMEOUT = 2.0
LONG = "これはとても長い一文目で、ゆっくりと話しています。二文目もまだまだ続きます。三文目で終わります。"
EVENTS_JS = """window.got = []; window.opened = false;
const source = new EventSource("/api/v1/events" + location.search);
source.onopen = () => { window.opened = true; };
for (const name of ["user", "say", "sentence", "interrupted", "error", "done"])
  source.addEventListener(name, (e) => window.got.push([name, JSON.parse(e.data)]));
true"""


class Client:
    """HTTP requests to the API with urllib; the key in a header, never in a command line."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             content_type: str = "application/json", key: str | None = "") -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": content_type} if data is not None else {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key or self.key}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                status, text = answer.status, answer.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode("utf-8")
        return status, json.loads(text)


class Events:
    """``curl -N`` on ``/api/v1/events``: each SSE event as (name, data)."""

    def __init__(self, url: str, header_file: Path) -> None:
        self.proc = subprocess.Popen([CURL, "-sSN", "-H", f"@{header_file}", url], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.events: list[tuple[str, dict]] = []
        self.connected = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        name, stdout = "", self.proc.stdout
        assert stdout is not None
        for raw in stdout:
            line = raw.decode("utf-8").rstrip("\n")
            with self.cond:
                if line.startswith("retry:"):
                    self.connected = True
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
                    name = ""
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, dict]]], object], timeout: float = WAIT) -> object:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.events), timeout)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def sentences(events: list, turn: int) -> set[tuple[int, str]]:
    return {(data["index"], data["state"]) for name, data in events if name == "sentence" and data["turn"] == turn}


def spoken(world: World, turn: int) -> bool:
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "spoken" and e.turn == turn for e in envs), WAIT))


def speech_started(world: World, turn: int) -> bool:
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.turn == turn
                                                    and e.body.get("state") == "started" for e in envs), WAIT))


def cancelled(world: World, turn: int) -> str:
    return str(world.bus.wait_for(lambda envs: next((e.body["reason"] for e in envs
                                                     if e.kind == "cancel" and e.turn == turn), ""), WAIT))


def lines_of(world: World, since: int) -> list[str]:
    return [r.line for r in world.avatar.received[since:]]


@pytest.mark.skipif(CURL is None, reason="no curl here (apt-get install curl)")
def test_the_control_api_end_to_end(tmp_path: Path):
    llm = ScriptedLLM(default="はい、わかりました。")
    server = ChatCompletionServer(llm).start()
    events = page = None
    try:
        with launched(tmp_path, server=server, avatar_kwargs=AVATAR, api={"answer_timeout": ANSWER_TIMEOUT}) as world:
            with Observer(world, "api", command="input") as api:
                key = web.access_key(world.cfg)
                url = subprocess.run([sys.executable, "-m", "stages.commands.cli", "input", "api", "--url"],
                                     env=world.env, capture_output=True, text=True, timeout=30).stdout.strip()
                assert url == f"http://127.0.0.1:{world.cfg['api']['port']}/api/v1/status?key={key}"
                client = Client(url.split("/status?")[0], key)  # as the README's curl lines do
                header = tmp_path / "api.header"
                header.touch(0o600)
                header.write_text(f"Authorization: Bearer {key}\n", encoding="ascii")
                events = Events(client.base + "/events", header)
                assert events.wait_for(lambda _: events.connected), "curl did not connect to the events"
                if CHROMIUM is not None:
                    page = browser.Browser(CHROMIUM, f"{client.base}/openapi.json?key={key}")
                    wait_until(page, "document.readyState", "complete")
                    page.eval(EVENTS_JS)
                    wait_until(page, "window.opened", True)
                asked = hostile_requests_reach_nothing(world, client, header, tmp_path)
                asked += say_with_a_gesture_and_a_voice(world, client, events, page)
                asked += ask_as_the_user(world, client, events)
                asked += say_cut_off_by_the_user_then_stop(world, client, events)
                asked += pipes_and_line_breaks_never_reach_mmdagent_raw(world, client)
                status_and_openapi(client)
                asked += a_bridge_that_does_not_answer_is_a_504_and_the_api_stops_at_once(world, client, api, events)
                log = api.log_path
    finally:
        if events is not None:
            events.close()
        if page is not None:
            page.close()
        server.stop()
    # every input on the bus came from a request the API took, and every one of those is there
    assert sorted(e.body["id"] for e in world.bus.of("input")) == sorted(asked)
    assert key not in log.read_text(encoding="utf-8", errors="replace")


def hostile_requests_reach_nothing(world: World, client: Client, header: Path, tmp: Path) -> list[str]:
    inputs, lines = len(world.bus.of("input")), len(world.avatar.received)
    refused = {
        "no key": client.call("POST", "/say", {"text": "鍵なし"}, key=None),
        "wrong key": client.call("POST", "/say", {"text": "違う鍵"}, key="not-the-key"),
        "bad JSON": client.call("POST", "/say", raw=b'{"text": "x"'),
        "not an object": client.call("POST", "/say", ["text"]),
        "missing text": client.call("POST", "/say", {"voice": "mei_voice_normal"}),
        "text not a string": client.call("POST", "/say", {"text": 42}),
        "tags not strings": client.call("POST", "/say", {"text": "x", "tags": [1]}),
        "unknown field": client.call("POST", "/ask", {"text": "x", "voice": "mei_voice_normal"}),
        "unknown voice": client.call("POST", "/say", {"text": "x", "voice": "robot_voice"}),
        "unknown tag": client.call("POST", "/say", {"text": "x", "tags": ["dancing"]}),
        "two voices": client.call("POST", "/say", {"text": "x", "tags": ["happy"], "voice": "mei_voice_sad"}),
        "empty text": client.call("POST", "/ask", {"text": " \n\t "}),
        "too long": client.call("POST", "/say", {"text": "あ" * (wire.INPUT_MAX_TEXT + 1)}),
        "not JSON": client.call("POST", "/say", raw=b"text=x", content_type="application/x-www-form-urlencoded"),
        "not UTF-8": client.call("POST", "/say", raw=b'{"text": "\xff"}'),
        "a body for stop": client.call("POST", "/stop", {"now": True}),
        "wrong method": client.call("GET", "/say"),
        "no such address": client.call("GET", "/nothing"),
    }
    codes = {what: status for what, (status, _) in refused.items()}
    assert codes == {"no key": 403, "wrong key": 403, "bad JSON": 400, "not an object": 400, "missing text": 400,
                     "text not a string": 400, "tags not strings": 400, "unknown field": 400, "unknown voice": 400,
                     "unknown tag": 400, "two voices": 400, "empty text": 400, "too long": 400, "not JSON": 415,
                     "not UTF-8": 400, "a body for stop": 400, "wrong method": 405, "no such address": 404}
    assert all(isinstance(body.get("error"), str) and client.key not in body["error"] for _, body in refused.values())
    assert "robot_voice" in refused["unknown voice"][1]["error"] and "dancing" in refused["unknown tag"][1]["error"]
    assert "mmdagent-llm input api --url" in refused["no key"][1]["error"]
    big = tmp / "big.json"
    big.write_bytes(b'{"text": "' + b"a" * 10_000_000 + b'"}')
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):  # with a length, and without one
        out = subprocess.run([CURL, "-sS", "-H", f"@{header}", "-H", "Content-Type: application/json", *extra,
                              "--data-binary", f"@{big}", "-w", "\n%{http_code}", client.base + "/say"],
                             capture_output=True, text=True, timeout=30)
        body, _, code = out.stdout.rpartition("\n")
        assert code == "413" and "larger than 65536 bytes" in json.loads(body)["error"], out
    assert len(world.bus.of("input")) == inputs and len(world.avatar.received) == lines
    return []


def say_with_a_gesture_and_a_voice(world: World, client: Client, events: Events, page) -> list[str]:
    requests, since = len(world.server.requests), len(world.avatar.received)
    status, answer = client.call("POST", "/say", {"text": "声と身振りの試験です。二文目です。", "tags": ["greeting"],
                                                  "voice": "mei_voice_sad"})
    assert status == 200 and answer["ok"] is True and answer["turn"] > 0, answer
    turn = answer["turn"]
    assert spoken(world, turn)
    lines = lines_of(world, since)
    assert "SYNTH_START|0|mei_voice_sad|声と身振りの試験です。" in lines
    assert any(line.startswith("MOTION_ADD|0|") and "mei_greeting.vmd" in line for line in lines), lines
    assert not any("mei_guide_sad.vmd" in line for line in lines)  # the voice's name brought no gesture of its own
    assert len(world.server.requests) == requests, "say asked the LLM"
    start = world.bus.of("turn_start", turn)[0].body
    assert start["source"] == "api" and start["say"].endswith("声と身振りの試験です。二文目です。")
    everything = {(0, "started"), (0, "finished"), (1, "started"), (1, "finished")}
    assert events.wait_for(lambda got: sentences(got, turn) >= everything and ("done", turn) in
                           {(n, d["turn"]) for n, d in got}), events.events
    said = next(d for n, d in events.events if n == "say" and d["turn"] == turn)
    assert said == {"turn": turn, "text": "声と身振りの試験です。二文目です。", "source": "api", "from": ""}
    if page is not None:  # the same events in a browser page, with EventSource
        got = (f"JSON.stringify(window.got.filter(([n, d]) => n === 'sentence' && d.turn === {turn})"
               f".map(([n, d]) => [d.index, d.state]))")
        deadline = time.monotonic() + WAIT
        while {tuple(x) for x in json.loads(page.eval(got))} < everything and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {tuple(x) for x in json.loads(page.eval(got))} >= everything
        assert page.eval(f"window.got.some(([n, d]) => n === 'say' && d.turn === {turn} && d.source === 'api')")
    return [answer["id"]]


def ask_as_the_user(world: World, client: Client, events: Events) -> list[str]:
    requests = len(world.server.requests)
    status, answer = client.call("POST", "/ask", {"text": "今日は何曜日？", "from": "テスター"})
    assert status == 200 and answer["ok"], answer
    turn = answer["turn"]
    assert spoken(world, turn)
    start = world.bus.of("turn_start", turn)[0].body
    assert (start["text"], start["source"], start["from"]) == ("今日は何曜日？", "api", "テスター")
    assert world.server.requests[requests]["messages"][-1] == {"role": "user", "content": "今日は何曜日？"}
    assert events.wait_for(lambda got: ("user", {"turn": turn, "text": "今日は何曜日？", "source": "api",
                                                 "from": "テスター"}) in got)
    return [answer["id"]]


def say_cut_off_by_the_user_then_stop(world: World, client: Client, events: Events) -> list[str]:
    status, first = client.call("POST", "/say", {"text": LONG})
    assert status == 200, first
    assert speech_started(world, first["turn"])
    world.avatar.send("RECOG_EVENT_START")  # the user speaks over it
    assert cancelled(world, first["turn"]) == "interrupted"
    world.avatar.send("RECOG_EVENT_STOP|ちょっと待って")
    assert events.wait_for(lambda got: (0, "cut") in sentences(got, first["turn"]) and any(
        n == "interrupted" and d["turn"] == first["turn"] and d["reason"] == "interrupted" for n, d in got))
    user = world.bus.wait_for(lambda envs: next((e.turn for e in envs if e.kind == "turn_start"
                                                 and e.body.get("text") == "ちょっと待って"), 0), WAIT)
    assert user and spoken(world, user)

    status, second = client.call("POST", "/say", {"text": LONG})
    assert status == 200, second
    assert speech_started(world, second["turn"])
    status, stop = client.call("POST", "/stop")
    assert status == 200 and stop["ok"] and stop["turn"] == second["turn"], stop
    assert cancelled(world, second["turn"]) == "stopped"
    assert events.wait_for(lambda got: any(n == "interrupted" and d["turn"] == second["turn"]
                                           and d["reason"] == "stopped" for n, d in got))
    status, idle = client.call("POST", "/stop", raw=b"{}")  # nothing to stop: done, no turn
    assert status == 200 and idle["ok"] and idle["turn"] == 0, idle
    return [first["id"], second["id"], stop["id"], idle["id"]]


def pipes_and_line_breaks_never_reach_mmdagent_raw(world: World, client: Client) -> list[str]:
    since = len(world.avatar.received)
    status, answer = client.call("POST", "/say", {
        "text": "前|SYNTH_START|0|mei_voice_angry|乗っ取り\nEXECUTE|calc.exe\r\nMODEL_DELETE|0\n後。"})
    assert status == 200, answer
    assert spoken(world, answer["turn"])
    lines = lines_of(world, since)
    synth = [line for line in lines if line.startswith("SYNTH_START|")]
    assert synth and all(line.count("|") == 3 and line.startswith("SYNTH_START|0|mei_voice_normal|") for line in synth)
    assert any("｜" in line for line in synth)  # the bar was made harmless, not dropped
    assert not any(line.startswith(("EXECUTE", "MODEL_DELETE")) or "\r" in line for line in world.avatar.received
                   for line in [line.line])
    return [answer["id"]]


def status_and_openapi(client: Client) -> None:
    status, health = client.call("GET", "/status")
    assert status == 200 and health["healthy"] is True and health["problems"] == [], health
    kinds = {p["name"]: (p["kind"], p["up"], p["ready"]) for p in health["processes"]}
    assert kinds["api"] == ("input", True, True) and kinds["bridge"] == ("pipeline", True, True)
    assert health["llm"]["model"] and health["turns"]
    status, spec = client.call("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/say", "/ask", "/stop", "/status", "/events"}
    assert "mei_voice_sad" in spec["paths"]["/say"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["voice"]["enum"]


def a_bridge_that_does_not_answer_is_a_504_and_the_api_stops_at_once(world: World, client: Client, api: Observer,
                                                                       events: Events) -> list[str]:
    bridge = pid_of(world, "bridge")
    os.kill(bridge, signal.SIGSTOP)
    try:
        asked_at = time.monotonic()
        status, answer = client.call("POST", "/stop")
        waited = time.monotonic() - asked_at
        assert status == 504 and "the pipeline or the bridge is down" in answer["error"], answer
        assert ANSWER_TIMEOUT <= waited < ANSWER_TIMEOUT + 3
        # the API is stopped while a request waits for the bridge and an event stream is open
        inputs = len(world.bus.of("input"))
        refused: list[tuple[int, Any]] = []
        waiting = threading.Thread(target=lambda: refused.append(client.call("POST", "/stop")), daemon=True)
        waiting.start()
        assert world.bus.wait_for(lambda envs: sum(e.kind == "input" for e in envs) > inputs, WAIT)
        asked_at = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        assert api.proc.wait(web.STOP_TIMEOUT + 2) == 0  # a stop that waited out its timeouts would take 6 s
        stopped_in = time.monotonic() - asked_at
        events.proc.wait(5)  # its stream ended with the server
        waiting.join(5)
        assert refused and refused[0][0] == 503 and "stopping" in refused[0][1]["error"], refused
    finally:
        os.kill(bridge, signal.SIGCONT)
    print(f"the API stopped in {stopped_in:.2f} s with a request and an event stream open")
    # their inputs were published: the bridge, back, answers them late (and nobody waits for that)
    return [e.body["id"] for e in world.bus.of("input")[-2:]]


# -- the shape of requests and events, without processes ----------------------------------------

def test_fields_are_checked_by_name_and_type():
    fields = {"text": str, "tags": list}
    assert fields_of(b'{"text": "x", "tags": ["a"]}', fields, ("text",)) == {"text": "x", "tags": ["a"]}
    assert fields_of(b"", {}) == {}
    for raw, why in ((b"[]", "JSON object"), (b"{", "not JSON"), (b'{"text": null}', "must be a string"),
                     (b'{"tags": "a", "text": "x"}', "list of strings"), (b'{"x": 1}', "unknown field 'x'"),
                     (b"{}", "missing field 'text'"), (b'"\xff"', "not UTF-8"), (b"1e999999", "JSON object")):
        with pytest.raises(Refused, match=why) as refused:
            fields_of(raw, fields, ("text",))
        assert refused.value.status == 400


def test_a_voice_is_the_name_that_sets_it_without_a_gesture_if_it_can():
    cfg = config_mod.load(Path("/dev/null"))
    cfg["expression"]["names"] = {"cheer": {"voice": "v_happy", "motion": "m.vmd"}, "glad": {"voice": "v_happy"},
                                  "wave": {"motion": "w.vmd"}}
    cfg["speech"]["voice"] = "v_normal"
    assert voice_tags(cfg) == {"v_happy": "glad", "v_normal": ""}
    spec = openapi(("cheer",), ["v_happy"])
    assert spec["paths"]["/say"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["tags"]["items"]["enum"] == ["cheer"]


def test_the_conversation_events_of_bus_events():
    make = wire.Sender("bridge").make
    assert conversation_event(make("turn_start", {"text": "やあ"}, turn=3)) == (
        "user", {"turn": 3, "text": "やあ", "source": "", "from": ""})
    greeting = make("turn_start", {"text": "", "say": "[happy] ようこそ", "source": "api"}, turn=4)
    assert conversation_event(greeting) == (
        "say", {"turn": 4, "text": "ようこそ", "source": "api", "from": ""})
    assert conversation_event(make("turn_start", {"text": "やあ", "resume": 3, "heard": []}, turn=5)) is None
    assert conversation_event(make("speech", {"state": "interrupted", "index": 1, "text": "a"}, turn=4)) == (
        "sentence", {"turn": 4, "index": 1, "text": "a", "state": "cut"})
    assert conversation_event(make("speech", {"state": "sent", "index": 1, "text": "a"}, turn=4)) is None
    assert conversation_event(make("cancel", {"reason": "lost", "spoken": []}, turn=4)) is None
    failed = make("turn_result", {"reason": "error", "cause": "timeout", "error": "slow"}, turn=4)
    assert conversation_event(failed) == (
        "error", {"turn": 4, "cause": "timeout", "error": "slow"})
    assert conversation_event(make("turn_result", {"reason": "done", "answer": "[sad] はい"}, turn=4)) == (
        "done", {"turn": 4, "reason": "done", "answer": "はい"})
