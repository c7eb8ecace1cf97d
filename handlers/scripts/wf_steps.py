"""Grizzly `process` handler behind the example workflows' `wf_*` handlers. One warm process per
handler; the first argument names the behaviour. Each request is a step event (its data = the
step's input plus `_step`); each reply ends with the terminator `{"done": true, ...}`.

Set WF_STEPS_LOG to a file to record one line per invocation (the tests count them)."""
import json
import os
import sys

ROLE = sys.argv[1] if len(sys.argv) > 1 else "echo"


def lint(d):
    diff = d.get("diff", "")
    return {"errors": diff.count("TODO"), "lines": len(diff.splitlines())}


def review(d):
    diff = d.get("diff", "")
    approved = "danger" not in diff
    return {"focus": d.get("focus"), "approved": approved,
            "comments": [] if approved else ["this change looks dangerous"]}


def merge(d):
    return {"merged": True, "pr": d.get("pr"), "approver": d.get("approver")}


def provision(d):
    if d.get("fail_on") == d.get("resource"):
        raise RuntimeError(f"cannot provision {d.get('resource')}: quota exceeded")
    return {"id": f"{d.get('resource')}-{d.get('env')}"}


def deprovision(d):
    return {"released": d.get("id")}


def batch_item(d):
    item = d.get("item")
    if item == "bad":
        raise RuntimeError("bad item")
    return {"item": item, "size": len(str(item))}


def batch_report(d):
    results = d.get("results") or []
    return {"count": len(results), "total_size": sum(r.get("size", 0) for r in results if r)}


def notify(d):
    return {"notified": d.get("to"), "message": d.get("message")}


ROLES = {"lint": lint, "review": review, "merge": merge, "provision": provision,
         "deprovision": deprovision, "batch_item": batch_item, "batch_report": batch_report,
         "notify": notify}

for line in sys.stdin:
    event = json.loads(line)
    data = event.get("data") or {}
    log = os.environ.get("WF_STEPS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"role": ROLE, "step": (data.get("_step") or {}).get("step"),
                                "instance": event.get("aggregateid")}) + "\n")
    try:
        out = ROLES.get(ROLE, lambda d: d)(data)
        print(json.dumps({"done": True, "output": out}), flush=True)
    except Exception as e:  # a failed step: the worker retries, then reports handler_failed
        print(json.dumps({"done": True, "error": str(e)}), flush=True)
