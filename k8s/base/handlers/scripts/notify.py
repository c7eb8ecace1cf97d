"""Grizzly `exec` handler: the event envelope arrives on stdin; stdout lines are the output."""
import json
import sys

event = json.load(sys.stdin)
print(f"summary for {event['aggregatetype']}/{event['aggregateid']}: {event['data'].get('summary')}")
