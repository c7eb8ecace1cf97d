"""Grizzly `process` handler: reads one event envelope per line on stdin, emits a `pong` event,
then the terminator line. Stays alive between events."""
import json
import sys

for line in sys.stdin:
    event = json.loads(line)
    print(json.dumps({"type": "pong", "data": {"reply_to": event["id"], "got": event["data"]}}), flush=True)
    print(json.dumps({"done": True, "output": "pong sent"}), flush=True)
