"""``mmdagent-llm observe metrics``: Prometheus metrics of the conversation and the processes.

Served at ``/metrics`` by prometheus_client's exposition (its text format, or OpenMetrics when the
scraper asks for it), with the access key of
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
from typing import Iterator

import prometheus_client
from aiohttp import web as aioweb
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from broker import config as config_mod
from broker import wire
from broker.liveness import PIPELINE
from broker.runtime import Stage
from stages.latency import TurnClock
from stages.observers import web

# no <name>_created series: every count starts with this observer, which Prometheus sees as a reset
prometheus_client.disable_created_metrics()

PREFIX = "mmdagent_llm_"
BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)
HISTOGRAMS = {"first_token": ("first_token_seconds", "from the utterance to the answer's first token"),
              "first_synth": ("first_synth_start_seconds", "from the utterance to the first SYNTH_START written"),
              "first_speech": ("first_speech_seconds", "from the utterance to SYNTH_EVENT_START (speech began)")}
# name: (help, label names)
COUNTERS = {"turns_total": ("turns opened by a user utterance", ()),
            "resumed_total": ("answers that went on under a new turn after a stage was lost in their middle", ()),
            "turn_results_total": ("turns the llm closed, by reason", ("reason",)),
            "interruptions_total": ("turns cancelled, by reason", ("reason",)),
            "errors_total": ("failed turns, by cause", ("cause",)),
            "stage_restarts_total": ("stage processes that came back with a new pid", ("stage",)),
            "tool_calls_total": ("tool calls of the LLM that gave a result, by tool", ("tool",)),
            "summaries_total": ("summaries of the history's oldest exchanges, by outcome", ("outcome",)),
            "tool_failures_total": ("tool calls of the LLM that failed, timed out or were cancelled, by tool",
                                    ("tool",))}
# counted by the bridge since its start: the observer sets them as they come, it does not add
BRIDGE_COUNTERS = {"bad_input_total": "stdin problems the bridge counted since its start, by reason"}


class Registry:
    """The observer's metrics, in a prometheus_client registry of their own (thread-safe: the
    library's locks), rendered by the library's exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(PREFIX + name, text, labels, registry=self.registry)
                         for name, (text, labels) in COUNTERS.items()}
        self.stage_up = Gauge(PREFIX + "stage_up", "1 while the process beats on the bus", ("stage",),
                              registry=self.registry)
        self.hist = {milestone: Histogram(PREFIX + name, text, buckets=BUCKETS, registry=self.registry)
                     for milestone, (name, text) in HISTOGRAMS.items()}
        self.lock = threading.Lock()
        self.bridge_counts: dict[str, dict[tuple[str, str], float]] = {name: {} for name in BRIDGE_COUNTERS}
        self.registry.register(_BridgeCounts(self))

    def count(self, name: str, label: tuple[str, str] = ("", ""), by: float = 1.0, value: float | None = None) -> None:
        """Add ``by`` to counter ``name`` (with ``label``: its one label's name and value), or, for
        one the bridge counts, set it to ``value``."""
        if name in BRIDGE_COUNTERS:
            with self.lock:
                self.bridge_counts[name][label] = value if value is not None else by
            return
        counter = self.counters[name]
        (counter.labels(**{label[0]: label[1]}) if label[0] else counter).inc(by)

    def up(self, stage: str, beating: bool) -> None:
        self.stage_up.labels(stage=stage).set(1.0 if beating else 0.0)

    def observe(self, milestone: str, seconds: float) -> None:
        self.hist[milestone].observe(seconds)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper asked for (``Accept``: the text format by default, or
        OpenMetrics), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def render(self) -> str:
        """The text format."""
        return self.exposition()[0].decode("utf-8")


class _BridgeCounts:
    """The bridge's own counts, as counters (a prometheus_client custom collector)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        with self.registry.lock:
            tables = {name: dict(table) for name, table in self.registry.bridge_counts.items()}
        for name, table in tables.items():
            family = CounterMetricFamily(PREFIX + name, BRIDGE_COUNTERS[name], labels=("reason",))
            for (_, reason), n in sorted(table.items()):
                family.add_metric((reason,), n)
            yield family


class Metrics(Stage):
    name = "metrics"
    topics = ("turn_start", "written", "speech", "cancel", "turn_result", "tool", "summary")

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.registry = Registry()
        self.clock = TurnClock()
        for stage in (*PIPELINE, "bridge"):
            self.registry.up(stage, False)
        self.server = web.Server(cfg, "metrics", [("GET", "/metrics", self._scrape)]).start()

    async def _scrape(self, request: aioweb.Request) -> aioweb.Response:
        body, content_type = self.registry.exposition(request.headers.get("Accept", ""))
        return aioweb.Response(body=body, headers={"Content-Type": content_type})

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
        self.registry.up(name, change != "gone")
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
        self.server.close()


def main(cfg: config_mod.Config) -> int:
    return web.run(Metrics, cfg, "metrics")
