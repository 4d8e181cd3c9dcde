"""The single-process baseline of ``python -m tests.bench``: the official streaming sample
(``seed/dialog-test-chatgpt.md``, "ストリーミング") as MMDAgent-EX would run it, with the same
openai client and the same server as the pipeline.

Kept as the seed writes it: one process, a reader thread for the stream, ``re.match`` on
``、！。？`` over the concatenated tokens, one ``SYNTH_START`` at a time after the previous
``SYNTH_EVENT_STOP``. Changed only so that it can run here: the key and server come from the
environment, and a sentence is the match's first group (the seed prints the whole match, remainder
included, and says it twice), so both sides speak the same text.
"""

import os
import queue
import re
import sys
import threading

from openai import OpenAI

sys.stdin.reconfigure(encoding="utf-8")
sys.stdout.reconfigure(encoding="utf-8")

client = OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "none", base_url=os.environ.get("OPENAI_BASE_URL"))
model = os.environ.get("SEED_MODEL", "gpt-4o-mini")
messages = [{"role": "system", "content": "あなたの名前はジェネと言います。"}]
input_queue: queue.Queue = queue.Queue()
output_queue: queue.Queue = queue.Queue()


def generate_response(text: str) -> None:
    messages.append({"role": "user", "content": text})
    completion = client.chat.completions.create(model=model, messages=messages, stream=True)
    total, part = "", ""
    for chunk in completion:
        token = chunk.choices[0].delta.content if chunk.choices else None
        if token:
            total += token
            part += token.strip()
            mm = re.match(r"(.*(、|！|。|？))(.*)", part)
            if mm:
                output_queue.put(mm.group(1))
                part = mm.group(3)
    if part:
        output_queue.put(part)
    output_queue.put("***END***")
    messages.append({"role": "assistant", "content": total})


def worker() -> None:
    while True:
        generate_response(input_queue.get())


def wait_synth_stop() -> None:
    while True:
        line = sys.stdin.readline()
        if not line or line.startswith("SYNTH_EVENT_STOP"):
            return


def main() -> None:
    threading.Thread(target=worker, daemon=True).start()
    for line in sys.stdin:
        found = re.findall(r"^RECOG_EVENT_STOP\|(.*)$", line.strip())
        if not found:
            continue
        input_queue.put(found[0])
        while True:
            sentence = output_queue.get()
            if sentence == "***END***":
                break
            print(f"SYNTH_START|0|mei_voice_normal|{sentence}", flush=True)
            wait_synth_stop()


if __name__ == "__main__":
    main()
