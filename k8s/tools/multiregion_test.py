#!/usr/bin/env python3
"""End-to-end test of k8s/multi-region on this machine (loopback only), run by
scripts/validate-k8s.sh.

Two single-server NATS "regions" are started with the committed region configuration: the
JetStream domain from region-*/nats-jetstream-limits.conf and the leafnode settings from
region-*/nats-site.conf (addresses and TLS files replaced by loopback ones). Then the
failover runbook of docs/multi-region.md is played:

 1. region A (use1) holds EVENTS and DLQ; region B (euw1) creates its mirrors from
    streams/euw1/*.json and catches up (same sequence numbers); no application message
    crosses the link directly, and a stray write to the passive region is refused;
 2. region A dies; region B is promoted the way Grizzly's ensure_streams does it (an update
    to Grizzly's stream config turns each mirror into a writable stream), and `grizzly cursors
    set --time` starts every listener and coordinator partition at the first event after the
    failover point; a re-sent event within the duplicate window is still dropped; `grizzly
    workflow restore` rebuilds the coordinators' state from the whole log and starts them after it;
 3. region A comes back and, per the failback steps, re-creates EVENTS from
    streams/use1/EVENTS.json, catching up with what region B wrote meanwhile; on the switch
    back `grizzly cursors set --seq` starts region A exactly at the first event B wrote.

Streams are created with num_replicas 1 here (one server per region); everything else is the
committed JSON. The promotion is done by the real `grizzly-coordinator` (its start-up
ensure_streams) when a build is found (GRIZZLY_COORDINATOR_BIN, `none` for no binary, or
release|debug under $CARGO_TARGET_DIR or target/), otherwise by the equivalent stream update.
The cursors are set by the `grizzly` CLI (the newer of the release and debug builds there, or
GRIZZLY_BIN); without a build that step fails. Needs NATS_SERVER (nats-server binary) and nats-py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).parent))
from check import make_test_tls  # noqa: E402

MR = Path(__file__).resolve().parents[1] / "multi-region"
ROOT = MR.parents[1]
FAILED: list[str] = []


def result(ok: bool, what: str, detail: str = "") -> None:
    print(("ok   " if ok else "FAIL ") + what + ("" if ok or not detail else f": {detail}"))
    if not ok:
        FAILED.append(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUBJECTS = {"EVENTS": ["events.>"], "DLQ": ["dlq.>"]}


def grizzly_stream_config(name: str, mirror_json: dict) -> dict:
    """The config Grizzly's ensure_streams writes: the committed JSON, subjects instead of mirror."""
    cfg = {k: v for k, v in mirror_json.items() if k != "mirror"}
    return cfg | {"subjects": SUBJECTS[name], "num_replicas": 1}


class Region:
    def __init__(self, name: str, work: Path, tls: Path, leaf_port: int, hub_port: int):
        self.name, self.dir = name, work / name
        self.dir.mkdir()
        self.port = free_port()
        site = (MR / name / "nats-site.conf").read_text()
        site = site.replace("/etc/nats-tls/leafnode", str(tls))
        site = site.replace("listen: 0.0.0.0:7422", f"listen: 127.0.0.1:{leaf_port}")
        site = re.sub(r"nats-leaf://[\w.-]+:7422", f"nats-leaf://localhost:{hub_port}", site)
        (self.dir / "site.conf").write_text(site)
        (self.dir / "jetstream-limits.conf").write_text((MR / name / "nats-jetstream-limits.conf").read_text())
        (self.dir / "nats.conf").write_text(
            f"server_name: {name}\nlisten: 127.0.0.1:{self.port}\n"
            f"jetstream {{\n  store_dir: {self.dir / 'store'}\n  sync_interval: always\n"
            f"  include ./jetstream-limits.conf\n}}\ninclude ./site.conf\n")
        self.proc = None

    def start(self):
        log = open(self.dir / "server.log", "a")
        self.proc = subprocess.Popen([os.environ["NATS_SERVER"], "-c", str(self.dir / "nats.conf")],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name}: nats-server did not start; see {self.dir / 'server.log'}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    async def connect(self):
        return await nats.connect(f"nats://127.0.0.1:{self.port}", max_reconnect_attempts=0)


async def api(nc, subject: str, body: dict | None = None) -> dict:
    reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=5)
    return json.loads(reply.data)


async def wait_count(nc, stream: str, want: int, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    n = -1
    while time.time() < deadline:
        info = await api(nc, f"$JS.API.STREAM.INFO.{stream}")
        n = info.get("state", {}).get("messages", -1)
        if n == want:
            return n
        await asyncio.sleep(0.2)
    return n


async def wait_leafnode(nc, domain: str, timeout: float = 15) -> bool:
    # The other domain's JetStream API answers across the link once the leafnode is up.
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = await api(nc, f"$JS.{domain}.API.INFO")
            if "error" not in info:
                return True
        except Exception:
            pass
        await asyncio.sleep(0.2)
    return False


async def publish(nc, n: int, start: int, tag: str) -> None:
    js = nc.jetstream()
    for i in range(start, start + n):
        await js.publish(f"events.agent.a{i % 4}.ping", json.dumps({"i": i}).encode(),
                         headers={"Nats-Msg-Id": f"{tag}-{i}"})


TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")


def coordinator_bin() -> Path | None:
    chosen = os.environ.get("GRIZZLY_COORDINATOR_BIN")
    if chosen:
        return None if chosen == "none" else Path(chosen)
    for profile in ("release", "debug"):
        candidate = TARGET / profile / "grizzly-coordinator"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def grizzly_bin() -> Path | None:
    chosen = os.environ.get("GRIZZLY_BIN")
    if chosen:
        return Path(chosen)
    built = [TARGET / p / "grizzly" for p in ("release", "debug")]
    built = [b for b in built if b.is_file() and os.access(b, os.X_OK)]
    return max(built, key=lambda b: b.stat().st_mtime, default=None)


def grizzly(region: "Region", *args: str, partitions: int = 8) -> subprocess.CompletedProcess:
    """The `grizzly` CLI against one region (the deployment's 8 partitions, R1 buckets here, the
    repository's handlers and workflows)."""
    binary = grizzly_bin()
    if binary is None:
        raise RuntimeError("no grizzly build (cargo build --workspace --bins) for `grizzly cursors`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIZZLY_")}
    env |= {"GRIZZLY_NATS_URL": f"nats://127.0.0.1:{region.port}", "GRIZZLY_STREAMS__REPLICAS": "1",
            "GRIZZLY_LOG": "warn", "GRIZZLY_PARTITIONS": str(partitions),
            "GRIZZLY_HANDLERS_DIR": str(ROOT / "handlers"), "GRIZZLY_WORKFLOWS_DIR": str(ROOT / "workflows")}
    return subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=region.dir)


def cursors_at(region: "Region", seq: int, what: str) -> None:
    """`grizzly cursors set` + `show`: every partition of both components starts at `seq`."""
    at = ["--seq", str(seq)] if what == "seq" else ["--time", what]
    done = grizzly(region, "cursors", "set", *at)
    shown = grizzly(region, "cursors", "show", "--json")
    try:
        parts = json.loads(shown.stdout)["partitions"]
        ok = done.returncode == 0 and len(parts) == 8 and all(
            p[c]["cursor"] == seq for p in parts for c in ("listener", "coordinator"))
    except (ValueError, KeyError):
        ok = False
    result(ok, f"{region.name}: `grizzly cursors set {' '.join(at)}` starts every listener and "
               f"coordinator partition at sequence {seq}", done.stdout + done.stderr + shown.stdout[:300])
    fewer = grizzly(region, "cursors", "set", "--seq", "1", partitions=4)
    result(fewer.returncode == 1 and "has a cursor for partition 7" in fewer.stderr,
           f"{region.name}: a partition count below the deployment's is refused", fewer.stderr)


async def promote(nc, region: "Region", streams: dict) -> str:
    """Region B's components start: their ensure_streams rewrites EVENTS and DLQ."""
    binary = coordinator_bin()
    if binary is None:
        for name in ("EVENTS", "DLQ"):
            await api(nc, f"$JS.API.STREAM.UPDATE.{name}", grizzly_stream_config(name, streams[name]))
        return "a stream update to Grizzly's config (no grizzly-coordinator build found)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIZZLY_")}
    env |= {
        "GRIZZLY_NATS_URL": f"nats://127.0.0.1:{region.port}",
        "GRIZZLY_STREAMS__REPLICAS": "1",
        "GRIZZLY_STREAMS__EVENTS_MAX_BYTES": str(streams["EVENTS"]["max_bytes"]),
        "GRIZZLY_STREAMS__DLQ_MAX_BYTES": str(streams["DLQ"]["max_bytes"]),
        "GRIZZLY_LOG": "warn",
    }
    log = open(region.dir / "coordinator.log", "w")
    proc = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=region.dir)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None:
            infos = [await api(nc, f"$JS.API.STREAM.INFO.{n}") for n in ("EVENTS", "DLQ", "TASKS")]
            if all("error" not in i for i in infos) and not any(i["config"].get("mirror") for i in infos):
                break
            await asyncio.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    return f"{binary.relative_to(ROOT) if binary.is_relative_to(ROOT) else binary} starting up"


async def scenario(work: Path) -> None:
    tls = work / "tls"
    tls.mkdir()
    make_test_tls(tls)
    leaf = free_port()
    a = Region("region-a", work, tls, leaf, leaf)
    b = Region("region-b", work, tls, leaf, leaf)
    euw1 = {n: json.loads((MR / f"streams/euw1/{n}.json").read_text()) for n in ("EVENTS", "DLQ")}
    use1 = {n: json.loads((MR / f"streams/use1/{n}.json").read_text()) for n in ("EVENTS", "DLQ")}
    try:
        a.start()
        b.start()
        na, nb = await a.connect(), await b.connect()
        result(await wait_leafnode(nb, "use1"), "region B reaches region A's JetStream domain use1 over the leafnode (mutual TLS)")

        # 1. Region A active; region B mirrors EVENTS and DLQ.
        for name in ("EVENTS", "DLQ"):
            r = await api(na, f"$JS.API.STREAM.CREATE.{name}", grizzly_stream_config(name, euw1[name]))
            result("error" not in r, f"region A: {name} created with Grizzly's config", str(r.get("error")))
            r = await api(nb, f"$JS.API.STREAM.CREATE.{name}", euw1[name] | {"num_replicas": 1})
            result("error" not in r, f"region B: {name} created from streams/euw1/{name}.json", str(r.get("error")))
        leak = await nb.subscribe("events.>")
        await publish(na, 20, 0, "a")
        await na.jetstream().publish("dlq.summarize", b'{"error":"x"}', headers={"Nats-Msg-Id": "d1"})
        n = await wait_count(nb, "EVENTS", 20)
        info_a, info_b = (await api(na, "$JS.API.STREAM.INFO.EVENTS"), await api(nb, "$JS.API.STREAM.INFO.EVENTS"))
        result(n == 20 and info_a["state"]["last_seq"] == info_b["state"]["last_seq"],
               "region B's EVENTS caught up with region A's (20 events, same sequence numbers)", f"has {n}")
        n = await wait_count(nb, "DLQ", 1)
        result(n == 1, "region B's DLQ caught up with region A's", f"has {n}")
        try:
            await leak.next_msg(timeout=0.5)
            result(False, "application subjects do not cross the leafnode (only mirroring does)")
        except Exception:
            result(True, "application subjects do not cross the leafnode (only mirroring does)")
        await leak.unsubscribe()
        try:
            await nb.jetstream().publish("events.agent.stray.ping", b"{}", timeout=1)
            result(False, "a stray write to the passive region is refused (no stream takes events.> there)")
        except Exception:
            result(True, "a stray write to the passive region is refused (no stream takes events.> there)")

        # 2. Failover: region A dies after 5 more events; region B is promoted.
        await asyncio.sleep(1.1)
        failover_point = dt.datetime.now(dt.timezone.utc)
        await asyncio.sleep(0.1)
        await publish(na, 5, 20, "a")
        n = await wait_count(nb, "EVENTS", 25)
        result(n == 25, "events written just before the failure reached region B", f"has {n}")
        await na.close()
        a.stop()
        # Before any component starts there (runbook step 3): events 1–20 came before the
        # failover point, 21–25 after it. EVENTS is still a mirror.
        cursors_at(b, 21, failover_point.isoformat().replace("+00:00", "Z"))
        how = await promote(nb, b, euw1)
        for name in ("EVENTS", "DLQ"):
            r = await api(nb, f"$JS.API.STREAM.INFO.{name}")
            result("error" not in r and not r.get("config", {}).get("mirror")
                   and r.get("config", {}).get("subjects") == SUBJECTS[name]
                   and r.get("state", {}).get("messages") == (25 if name == "EVENTS" else 1),
                   f"region B: {name} promoted, history kept, by {how}", json.dumps(r)[:300])
        ack = await nb.jetstream().publish("events.agent.a1.ping", b"{}", headers={"Nats-Msg-Id": "a-21"})
        result(ack.duplicate is True, "an event re-sent within the duplicate window is dropped after promotion")
        # Runbook step 4: the coordinators' state is rebuilt from the whole log and they start
        # after it; the listeners stay at the failover point.
        restored = grizzly(b, "workflow", "restore")
        shown = grizzly(b, "cursors", "show", "--json")
        try:
            parts = json.loads(shown.stdout)["partitions"]
            ok = restored.returncode == 0 and "replayed events 1–25" in restored.stdout and all(
                p["coordinator"]["cursor"] == 26 and p["listener"]["cursor"] == 21 for p in parts)
        except (ValueError, KeyError):
            ok = False
        result(ok, "region B: `grizzly workflow restore` replays the log into the coordinators' state "
                   "and starts them after it", restored.stdout + restored.stderr + shown.stdout[:300])
        await publish(nb, 3, 100, "b")
        n = await wait_count(nb, "EVENTS", 28, 5)
        result(n == 28, "region B accepts new events once promoted", f"has {n}")

        # 3. Failback: region A returns and re-creates EVENTS from streams/use1/EVENTS.json.
        a.start()
        na = await a.connect()
        result(await wait_leafnode(na, "euw1", 30), "region A, restarted, reaches region B's domain euw1")
        await api(na, "$JS.API.STREAM.DELETE.EVENTS")
        r = await api(na, "$JS.API.STREAM.CREATE.EVENTS", use1["EVENTS"] | {"num_replicas": 1})
        result("error" not in r, "region A: EVENTS re-created from streams/use1/EVENTS.json", str(r.get("error")))
        n = await wait_count(na, "EVENTS", 28)
        result(n == 28, "region A caught up with everything region B holds (28 events)", f"has {n}")
        # Planned switch back: region A starts exactly where region B stopped (mirrors keep
        # sequence numbers): sequence 26, region B's first own event.
        r = await api(na, "$JS.API.STREAM.UPDATE.EVENTS", grizzly_stream_config("EVENTS", use1["EVENTS"]))
        result("error" not in r, "region A: EVENTS promoted again for the switch back", str(r.get("error")))
        got = [json.loads(base64.b64decode((await api(na, "$JS.API.STREAM.MSG.GET.EVENTS", {"seq": s}))
                                           ["message"]["data"]))["i"] for s in (26, 27, 28)]
        result(got == [100, 101, 102], "region A holds region B's own events at sequences 26–28", f"got {got}")
        cursors_at(a, 26, "seq")
        await na.close()
        await nb.close()
    finally:
        a.stop()
        b.stop()


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        try:
            asyncio.run(asyncio.wait_for(scenario(Path(work)), timeout=120))
        except Exception as e:  # a hang or crash is a failure, with the servers' logs
            result(False, "multi-region scenario ran to the end", repr(e))
            for log in Path(work).glob("*/server.log"):
                print(f"--- {log}\n" + log.read_text()[-3000:])
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
