"""The llm stage's client goes through the proxy the environment names (``HTTP_PROXY``,
``HTTPS_PROXY``, ``NO_PROXY``), as the openai client does by default: its own transport (for
requests that can be cut off) must not lose that, or every turn fails behind a school's proxy
while ``doctor`` passes."""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse

import openai

from stages.llm.llm_http import make_client
from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import tokens_of


class _Proxy(http.server.ThreadingHTTPServer):
    """A forward proxy for plain http: takes ``POST http://host/path``, sends it to ``target``."""

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        proxy: _Proxy = self.server  # type: ignore[assignment]
        proxy.seen.append(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=10)
        upstream.request("POST", urllib.parse.urlsplit(self.path).path, body,
                         {"Content-Type": "application/json", "Authorization": self.headers.get("Authorization", "")})
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    def log_message(self, *args: object) -> None:
        pass


def test_requests_go_through_the_proxy_the_environment_names(monkeypatch):
    server = ChatCompletionServer(lambda body: tokens_of("はい、どうぞ。")).start()
    proxy = _Proxy(server.base_url)
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        client, _ = make_client("k", "http://llm.invalid/v1", 0, openai.Timeout(10))
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "やあ"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "はい、どうぞ。"
        assert proxy.seen == ["http://llm.invalid/v1/chat/completions"]
        # NO_PROXY: straight to the server
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        client, _ = make_client("k", server.base_url, 0, openai.Timeout(10))
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "やあ"}])
        assert answer.choices[0].message.content == "はい、どうぞ。" and len(proxy.seen) == 1
    finally:
        proxy.shutdown()
        proxy.server_close()
        server.stop()
