"""An observer subscribed to everything, as its own process: ``python -m tests.bus_tap``.

For ``python -m tests.bench``: it decodes every envelope on the session's bus (the configuration
comes from ``MMDAGENT_LLM_CONFIG``, as for any stage) and does nothing else, so the bench can show
that an observer tapping the whole bus changes none of the pipeline's figures. It prints
``ready`` once the first envelope came (its subscription is in place), and on SIGTERM the number
of envelopes it decoded.
"""

from __future__ import annotations

import signal
import sys

import zmq

from broker import config as config_mod
from broker import wire
from broker.runtime import connect


def main() -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sub = connect(config_mod.load(), zmq.SUB, "events_out", ("",))
    count = 0
    while not stop:
        if sub.poll(200):
            wire.decode(sub.recv_multipart())
            count += 1
            if count == 1:
                print("ready", flush=True)
    sub.close(linger=0)
    print(count, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
