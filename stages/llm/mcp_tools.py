"""Tools of MCP servers (``[tools.mcp]``), offered to the LLM beside the built-in ones.

Each server is named in the configuration, as a command to start (stdio) or a URL (streamable
HTTP)::

    [tools.mcp]
    weather = { command = "python", args = ["weather_server.py"] }
    search = { url = "http://127.0.0.1:8000/mcp" }

:class:`McpTools` connects to them on a thread of its own (an asyncio loop: the ``mcp`` SDK is
async, and is imported only when a server is configured), in the background: a turn never
waits for a server. Each server has :data:`START_TIMEOUT` seconds to start and list its tools;
one that fails or hangs is reported once (:attr:`McpTools.problems`, which the llm stage logs,
publishes as an error ``notice``, shown on the avatar's screen, and carries in its heartbeat) and
its tools are left out. A tool's name is its own, or ``<server>_<name>`` where two would meet.
A call's result is the text of its content, given to the model only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any, Callable

from stages.llm.tools import Tool

log = logging.getLogger("mmdagent_llm")

START_TIMEOUT = 10.0  # seconds a server has to start and list its tools
_NAME = re.compile(r"[^A-Za-z0-9_-]")  # what an OpenAI function name may not hold


class McpTools:
    def __init__(self, servers: dict[str, dict[str, Any]], taken: set[str],
                 on_problem: Callable[[str, str], None]) -> None:
        """``servers``: ``[tools.mcp]``; ``taken``: the names of the built-in tools;
        ``on_problem(server, what)``: called once per server that cannot be used (on the loop's thread)."""
        self.servers, self.taken, self.on_problem = servers, set(taken), on_problem
        self.tools: dict[str, Tool] = {}   # replaced whole as servers come up: read without a lock
        self.state: dict[str, str] = {name: "starting" for name in servers}
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="mcp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        self._loop.run_until_complete(self._serve_all())

    async def _serve_all(self) -> None:
        await asyncio.gather(*(self._serve(name, spec) for name, spec in self.servers.items()))

    async def _serve(self, name: str, spec: dict[str, Any]) -> None:
        """Keep one server's session open until :meth:`close`."""
        try:
            import mcp  # ~40 MB and 0.6 s: only when a server is configured
        except ImportError:
            self._problem(name, "needs the mcp package (pip install '.[mcp]' in the mmdagent-llm folder, "
                                "or pip install 'mcp>=2.3,<3')")
            return
        target: Any = spec["url"] if spec.get("url") else mcp.StdioServerParameters(
            command=spec["command"], args=list(spec.get("args", [])))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                client = mcp.Client(target)
                await client.__aenter__()
        except BaseException as exc:  # noqa: BLE001 - anything a server does at start is its own problem
            self._problem(name, f"did not start within {START_TIMEOUT:g} s" if isinstance(exc, TimeoutError)
                          else f"could not start: {_said(exc)}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        try:
            async with asyncio.timeout(START_TIMEOUT):
                listed = await client.list_tools()
            self._add(name, client, listed.tools)
            assert self._stop is not None
            await self._stop.wait()
        except TimeoutError:
            self._problem(name, f"did not list its tools within {START_TIMEOUT:g} s")
        except Exception as exc:
            self._problem(name, f"failed: {_said(exc)}")
        finally:
            try:
                await client.__aexit__(None, None, None)
            except BaseException:  # noqa: BLE001 - it is going away either way
                pass

    def _add(self, server: str, client: Any, listed: list[Any]) -> None:
        tools = dict(self.tools)
        for item in listed:
            own = _NAME.sub("_", str(item.name))[:64]
            name = own if own not in tools and own not in self.taken else _NAME.sub("_", f"{server}_{own}")[:64]
            schema = item.model_dump(by_alias=True).get("inputSchema") or {"type": "object", "properties": {}}
            tools[name] = Tool(name, str(item.description or "")[:1000], schema, self._caller(client, str(item.name)))
        self.tools = tools
        self.state[server] = f"ok: {len(listed)} tool(s)"
        log.info("MCP server %s: %d tool(s): %s", server, len(listed), ", ".join(str(t.name) for t in listed)[:300])

    def _caller(self, client: Any, tool: str) -> Callable[[dict[str, Any]], str]:
        def run(args: dict[str, Any]) -> str:  # on a tool thread (stages.llm.tools.call): the loop does the work
            future = asyncio.run_coroutine_threadsafe(client.call_tool(tool, args), self._loop)
            result = future.result()
            text = "\n".join(getattr(part, "text", "") for part in result.content if getattr(part, "text", ""))
            if getattr(result, "isError", False):
                raise RuntimeError(text[:300] or "the tool reported an error")
            return text
        return run

    def _problem(self, server: str, what: str) -> None:
        self.state[server] = f"failed: {what}"
        self.on_problem(server, what)

    def close(self) -> None:
        """End every session (their server processes with them)."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT + 5)


def _said(exc: BaseException) -> str:
    """What went wrong, in a line: the first real error inside the SDK's task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
