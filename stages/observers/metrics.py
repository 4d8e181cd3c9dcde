"""``mmdagent-llm observe metrics``: Prometheus metrics of the conversation and the processes.

Served in Prometheus's text format (0.0.4) at ``/metrics``, with the access key of
:mod:`stages.observers.web` as a bearer token. All counts are since this observer started.

==================================================== =========== =================================
metric                                               type        labels, meaning
==================================================== =========== =================================
``mmdagent_llm_turns_total``                         counter     turns opened (utterances, greetings)
``mmdagent_llm_resumed_total``                       counter     answers resumed after a stage was lost
``mmdagent_llm_turn_results_total``                  counter     ``reason``: how the llm closed them
``mmdagent_llm_interruptions_total``                 counter     ``reason``: cancels (interrupted,
                                                                 superseded, away)
``mmdagent_llm_errors_total``                        counter     ``cause``: failed turns
``mmdagent_llm_stage_restarts_total``                counter     ``stage``: a new pid came
``mmdagent_llm_stage_up``                            gauge       ``stage``: 1 while it beats
``mmdagent_llm_bad_input_total``                     counter     ``reason``: stdin problems the
                                                                 bridge counted (since its start)
``mmdagent_llm_tool_calls_total``                    counter     ``tool``: calls that gave a result
``mmdagent_llm_tool_failures_total``                 counter     ``tool``: calls that failed, timed
                                                                 out or were cancelled
``mmdagent_llm_summaries_total``                     counter     ``outcome`` (``ok``, ``failed``): the
                                                                 history's oldest exchanges folded
``mmdagent_llm_first_token_seconds``                 histogram   utterance -> first token
``mmdagent_llm_first_synth_start_seconds``           histogram   utterance -> first SYNTH_START
``mmdagent_llm_first_speech_seconds``                histogram   utterance -> SYNTH_EVENT_START
==================================================== =========== =================================

Latencies are those of :mod:`stages.latency`.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler

from broker import config as config_mod
from broker import wire
from broker.liveness import PIPELINE
from broker.runtime import Stage
from stages.latency import TurnClock
from stages.observers import web

PREFIX = "mmdagent_llm_"
BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)
HISTOGRAMS = {"first_token": ("first_token_seconds", "from the utterance to the answer's first token"),
              "first_synth": ("first_synth_start_seconds", "from the utterance to the first SYNTH_START written"),
              "first_speech": ("first_speech_seconds", "from the utterance to SYNTH_EVENT_START (speech began)")}
COUNTERS = {"turns_total": "turns opened by a user utterance",
            "resumed_total": "answers that went on under a new turn after a stage was lost in their middle",
            "turn_results_total": "turns the llm closed, by reason",
            "interruptions_total": "turns cancelled, by reason",
            "errors_total": "failed turns, by cause",
            "stage_restarts_total": "stage processes that came back with a new pid",
            "bad_input_total": "stdin problems the bridge counted since its start, by reason",
            "tool_calls_total": "tool calls of the LLM that gave a result, by tool",
            "summaries_total": "summaries of the history's oldest exchanges, by outcome",
            "tool_failures_total": "tool calls of the LLM that failed, timed out or were cancelled, by tool"}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Registry:
    """Counters, histograms and gauges, rendered in the text format; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, dict[tuple[str, str], float]] = {name: {} for name in COUNTERS}
        self.gauges: dict[tuple[str, str], float] = {}
        self.hist: dict[str, list[int]] = {name: [0] * len(BUCKETS) for name in HISTOGRAMS}
        self.sums: dict[str, float] = {name: 0.0 for name in HISTOGRAMS}

    def count(self, name: str, label: tuple[str, str] = ("", ""), by: float = 1.0, value: float | None = None) -> None:
        with self.lock:
            table = self.counters[name]
            table[label] = value if value is not None else table.get(label, 0.0) + by

    def observe(self, milestone: str, seconds: float) -> None:
        with self.lock:
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.hist[milestone][i] += 1
            self.sums[milestone] += seconds

    def render(self) -> str:
        out: list[str] = []
        with self.lock:
            for name, text in COUNTERS.items():
                out += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} counter"]
                for (key, value), n in sorted(self.counters[name].items()):
                    labels = f'{{{key}="{_label(value)}"}}' if key else ""
                    out.append(f"{PREFIX}{name}{labels} {n:g}")
            out += [f"# HELP {PREFIX}stage_up 1 while the process beats on the bus", f"# TYPE {PREFIX}stage_up gauge"]
            for (_, stage), up in sorted(self.gauges.items()):
                out.append(f'{PREFIX}stage_up{{stage="{_label(stage)}"}} {up:g}')
            for milestone, (name, text) in HISTOGRAMS.items():
                out += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} histogram"]
                for bound, n in zip(BUCKETS, self.hist[milestone]):
                    le = "+Inf" if bound == math.inf else f"{bound:g}"
                    out.append(f'{PREFIX}{name}_bucket{{le="{le}"}} {n}')
                out.append(f"{PREFIX}{name}_sum {self.sums[milestone]:.6f}")
                out.append(f"{PREFIX}{name}_count {self.hist[milestone][-1]}")
        return "\n".join(out) + "\n"


class Metrics(Stage):
    name = "metrics"
    topics = ("turn_start", "written", "speech", "cancel", "turn_result", "tool", "summary")

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.registry = Registry()
        self.clock = TurnClock()
        for stage in (*PIPELINE, "bridge"):
            self.registry.gauges[("stage", stage)] = 0.0
        self.server = web.serve(cfg, "metrics", {"/metrics": self._scrape})

    def _scrape(self, req: BaseHTTPRequestHandler) -> None:
        body = self.registry.render().encode("utf-8")
        req.send_response(200)
        req.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def on_event(self, env: wire.Envelope) -> None:
        mark = self.clock.observe(env)
        if mark is not None:
            self.registry.observe(*mark)
        if env.kind == "turn_start":
            self.registry.count("turns_total" if "resume" not in env.body else "resumed_total")
        elif env.kind == "cancel":
            self.registry.count("interruptions_total", ("reason", str(env.body.get("reason"))))
        elif env.kind == "tool":
            self.registry.count("tool_calls_total" if env.body.get("ok") is True else "tool_failures_total",
                                ("tool", str(env.body.get("name"))[:64]))
        elif env.kind == "summary":
            self.registry.count("summaries_total", ("outcome", "ok" if env.body.get("ok") is True else "failed"))
        elif env.kind == "turn_result":
            self.registry.count("turn_results_total", ("reason", str(env.body.get("reason"))))
            if env.body.get("reason") == "error":
                self.registry.count("errors_total", ("cause", str(env.body.get("cause") or "other")))

    def on_peer(self, name: str, change: str) -> None:
        with self.registry.lock:
            self.registry.gauges[("stage", name)] = 0.0 if change == "gone" else 1.0
        if change == "restarted":
            self.registry.count("stage_restarts_total", ("stage", name))

    def on_heartbeat(self, env: wire.Envelope) -> None:
        if env.body.get("stage") != "bridge":
            return
        bad = (env.body.get("info") or {}).get("bad_input")
        if isinstance(bad, dict):
            for reason, n in list(bad.items())[:20]:
                if isinstance(n, int):
                    self.registry.count("bad_input_total", ("reason", str(reason)[:40]), value=float(n))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(cfg: config_mod.Config) -> int:
    return web.run(Metrics, cfg, "metrics")
