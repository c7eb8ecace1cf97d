#!/usr/bin/env python3
"""Checks for Grizzly's Kubernetes manifests, run by scripts/validate-k8s.sh.

Subcommands:
  sync-handlers [--fix]      k8s/base/handlers mirrors the repository's handlers/
  manifests OUT RENDERED...  schema validation (built-in kinds with kubernetes-validate --strict,
                             custom resources with validate-crs.mjs) plus Grizzly's own rules
  nats-config OUT RENDERED...  `nats-server -t` on every rendered NATS configuration
  alert-coverage RULES TESTS   every alert and recording rule has a promtool unit test

Every check prints `ok  ...` or `FAIL ...`; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
FAILURES: list[str] = []

# Kubernetes versions the manifests must be valid for (oldest supported, newest known).
K8S_VERSIONS = ("1.29.0", "1.37.0")
# Kinds validated by validate-crs.mjs instead of the Kubernetes OpenAPI schemas.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# Trigger metadata the KEDA nats-jetstream scaler reads (keda.sh/docs/scalers/nats-jetstream).
NATS_JETSTREAM_METADATA = {
    "natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold",
    "activationLagThreshold", "useHttps",
}
COMPONENTS = ("grizzly-listener", "grizzly-coordinator", "grizzly-worker")
HEALTH_PORT = 9090


def result(ok: bool, what: str, detail: str = "") -> bool:
    if ok:
        print(f"ok   {what}")
    else:
        FAILURES.append(what)
        print(f"FAIL {what}" + (f": {detail}" if detail else ""))
    return ok


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    return found[0] if len(found) == 1 else None


# --- quantities and sizes ---------------------------------------------------------------------

def k8s_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        raise ValueError(f"unsupported quantity {q!r}")
    mult = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(m.group(1)) * mult


def nats_bytes(q: str) -> int:
    # nats-server sizes: K/KB/M/MB/G/GB/T/TB are all powers of 1024.
    m = re.fullmatch(r"(\d+)\s*([KMGT]B?)?", q.strip(), re.I)
    if not m:
        raise ValueError(f"unsupported NATS size {q!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def go_duration_s(d: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", d):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --- settings known to the binaries (shared/src/config.rs) -----------------------------------

def settings_env_names() -> set[str]:
    """GRIZZLY_* names the binaries accept, from the Settings structs in shared/src/config.rs."""
    src = (ROOT / "shared/src/config.rs").read_text()
    structs: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", src, re.S):
        fields = re.findall(r"^\s*pub (\w+):\s*([^,\n]+),", m.group(2), re.M)
        structs[m.group(1)] = fields
    names: set[str] = set()

    def walk(struct: str, prefix: str):
        for field, ty in structs.get(struct, []):
            ty = ty.strip()
            inner = re.sub(r"^Option<(.*)>$", r"\1", ty)
            if inner in structs:
                walk(inner, f"{prefix}{field.upper()}__")
            elif "BTreeMap" in ty or "HashMap" in ty:
                names.add(f"{prefix}{field.upper()}__*")
            else:
                names.add(f"{prefix}{field.upper()}")

    walk("Settings", "GRIZZLY_")
    not_settings = re.search(r"const NOT_SETTINGS: &\[&str\] = &\[(.*?)\];", src, re.S)
    if not_settings:
        names |= set(re.findall(r'"(GRIZZLY_\w+)"', not_settings.group(1)))
    return names


def env_name_known(name: str, known: set[str]) -> bool:
    return name in known or any(k.endswith("*") and name.startswith(k[:-1]) for k in known)


# --- sync of the handler copies ----------------------------------------------------------------

def cmd_sync_handlers(fix: bool) -> None:
    src_dir, copy_dir = ROOT / "handlers", K8S / "base/handlers"
    copies = sorted(p.relative_to(copy_dir) for p in copy_dir.rglob("*") if p.is_file())
    originals = sorted(p.relative_to(src_dir) for p in src_dir.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
    drift = [str(p) for p in copies if not (src_dir / p).is_file()
             or not filecmp.cmp(src_dir / p, copy_dir / p, shallow=False)]
    if fix:
        for p in copies:
            if (src_dir / p).is_file():
                shutil.copyfile(src_dir / p, copy_dir / p)
        drift = []
    result(not drift, "k8s/base/handlers matches handlers/",
           f"differs: {', '.join(drift)} (run scripts/validate-k8s.sh --sync, or update the copy)")
    missing = [str(p) for p in originals if p not in copies]
    if missing:
        print(f"note handlers/ files not deployed by k8s/base: {', '.join(missing)}")
    wf = sorted(p.name for p in (ROOT / "workflows").glob("*.y*ml")) if (ROOT / "workflows").is_dir() else []
    deployed = {k for k in (kustomization_generator("grizzly-workflows") or {})}
    if [w for w in wf if w not in deployed]:
        print(f"note workflows/ files not deployed by k8s/base: {', '.join(w for w in wf if w not in deployed)}")


def kustomization_generator(name: str) -> dict | None:
    kust = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    for gen in kust.get("configMapGenerator", []):
        if gen["name"] == name:
            return {f.split("=", 1)[0]: f for f in gen.get("files", [])}
    return None


# --- manifests -----------------------------------------------------------------------------

def validate_builtin(name: str, docs: list[dict]) -> None:
    import kubernetes_validate  # from .tools/k8s/pypi

    for version in K8S_VERSIONS:
        problems = []
        for d in docs:
            if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{d['kind']}/{d['metadata'].get('name')}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{d['kind']}/{d['metadata'].get('name')}: no schema ({e})")
        result(not problems, f"{name}: built-in kinds valid (strict) for Kubernetes {version}",
               "; ".join(problems))


def validate_custom(name: str, docs: list[dict], npm_prefix: str, scratch: Path) -> None:
    crs = [{"file": name, "doc": d} for d in docs if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS]
    if not crs:
        return
    path = scratch / f"{name.replace('/', '_')}-crs.json"
    path.write_text(json.dumps(crs))
    run = subprocess.run(["node", str(K8S / "tools/validate-crs.mjs"), npm_prefix, str(path)],
                         capture_output=True, text=True)
    bad = [l for l in run.stdout.splitlines() if l.startswith("FAIL")]
    result(run.returncode == 0, f"{name}: custom resources valid (strict): "
           + ", ".join(f"{c['doc']['kind']}/{c['doc']['metadata']['name']}" for c in crs),
           "; ".join(bad) or run.stderr.strip())


def grizzly_env(docs) -> dict[str, str]:
    cm = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("grizzly-config")]
    return dict(cm[0]["data"]) if len(cm) == 1 else {}


def configmap(docs, prefix):
    cms = [d for d in find(docs, "ConfigMap") if re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    return cms[0] if len(cms) == 1 else None


def check_grizzly_rules(name: str, docs: list[dict], known_env: set[str]) -> None:
    env = grizzly_env(docs)
    result(bool(env), f"{name}: ConfigMap grizzly-config present")
    deployments = {d["metadata"]["name"]: d for d in find(docs, "Deployment")}

    # Every GRIZZLY_* variable names a setting: an unknown one stops the binaries at start.
    names = set(env)
    for dep in deployments.values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
    unknown = sorted(n for n in names if n.startswith("GRIZZLY_") and not env_name_known(n, known_env))
    result(not unknown, f"{name}: every GRIZZLY_* variable is a setting in shared/src/config.rs",
           f"unknown: {', '.join(unknown)}")

    partitions = int(env.get("GRIZZLY_PARTITIONS", "8"))
    handlers_cm = configmap(docs, "grizzly-handlers")
    handler_names = sorted(yaml.safe_load(v)["name"] for k, v in (handlers_cm or {}).get("data", {}).items()
                           if k.endswith((".yaml", ".yml")) and "." not in k.rsplit(".", 1)[0])

    # Components: probes, port, resources, volumes, disruption budget, drain time.
    pdbs = find(docs, "PodDisruptionBudget")
    for comp in COMPONENTS:
        dep = deployments.get(comp)
        if not result(dep is not None, f"{name}: Deployment {comp} present"):
            continue
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        probes_ok = all(
            c.get(probe, {}).get("httpGet", {}).get("path") == path
            and ports.get(c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"]) == HEALTH_PORT
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"))
        )
        result(probes_ok, f"{name}: {comp} liveness /healthz and readiness /readyz on port {HEALTH_PORT}")
        res = c.get("resources", {})
        result(all(k in res.get("requests", {}) for k in ("cpu", "memory")) and "memory" in res.get("limits", {}),
               f"{name}: {comp} has cpu/memory requests and a memory limit")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        hv = vols.get(mounts.get("/app/handlers"), {}).get("configMap", {})
        wv = vols.get(mounts.get("/app/workflows"), {}).get("configMap", {})
        cm_ok = (handlers_cm is not None and hv.get("name") == handlers_cm["metadata"]["name"]
                 and wv.get("name", "").startswith("grizzly-workflows"))
        result(cm_ok, f"{name}: {comp} mounts the handlers and workflows ConfigMaps at /app/handlers, /app/workflows")
        if handlers_cm is not None and "items" in hv:
            keys = set(handlers_cm.get("data", {}))
            items = {i["key"] for i in hv["items"]}
            result(keys == items, f"{name}: {comp} handlers volume items cover every ConfigMap key",
                   f"not mounted: {sorted(keys - items)}; no such key: {sorted(items - keys)}")
        envs = {e["name"]: e for e in c.get("env", [])}
        secret = envs.get("NATS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
        url = envs.get("GRIZZLY_NATS_URL", {}).get("value", "")
        names_in_order = [e["name"] for e in c.get("env", [])]
        result(secret.get("name") == "grizzly-nats" and "$(NATS_PASSWORD)@" in url
               and names_in_order.index("NATS_PASSWORD") < names_in_order.index("GRIZZLY_NATS_URL"),
               f"{name}: {comp} logs in to NATS with the password from Secret grizzly-nats",
               f"GRIZZLY_NATS_URL={url!r}, NATS_PASSWORD from {secret}")
        sc = c.get("securityContext", {})
        result(pod.get("securityContext", {}).get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False
               and sc.get("readOnlyRootFilesystem") is True,
               f"{name}: {comp} runs as non-root, no privilege escalation, read-only root filesystem")
        selector = dep["spec"]["selector"]["matchLabels"]
        result(any(p["spec"]["selector"].get("matchLabels") == selector for p in pdbs),
               f"{name}: {comp} has a PodDisruptionBudget")
        env_c = {e["name"]: e.get("value") for e in c.get("env", [])}
        if comp == "grizzly-worker":
            grace = pod.get("terminationGracePeriodSeconds", 30)
            drain = go_duration_s(env_c.get("GRIZZLY_WORKER__DRAIN_TIMEOUT") or env.get("GRIZZLY_WORKER__DRAIN_TIMEOUT", "30s"))
            result(grace >= 120 and grace >= drain + 10,
                   f"{name}: worker grace period ({grace}s) >= 120s and covers the drain deadline ({drain:g}s) + 10s")
            secret_refs = [e for e in c.get("env", []) if e["name"] == "ANTHROPIC_API_KEY"]
            result(bool(secret_refs) and "secretKeyRef" in secret_refs[0].get("valueFrom", {}),
                   f"{name}: worker reads ANTHROPIC_API_KEY from a Secret")
        for cont in pod["containers"]:
            image = cont["image"]
            result(":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                   f"{name}: {comp} image {image} has a pinned tag")

    # NATS: three servers, persistent volumes, fsync always, routes, storage budget.
    sts = one(docs, "StatefulSet", "nats")
    nats_cm = configmap(docs, "nats-config")
    if result(sts is not None and nats_cm is not None, f"{name}: NATS StatefulSet and nats-config present"):
        replicas = sts["spec"].get("replicas", 1)
        conf = nats_cm["data"]["nats.conf"]
        limits = nats_cm["data"].get("jetstream-limits.conf", "")
        result(replicas == 3, f"{name}: NATS runs 3 servers", f"replicas={replicas}")
        result(re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M) is not None,
               f"{name}: JetStream sync_interval: always")
        auth = nats_cm["data"].get("auth.conf", "")
        result("include ./auth.conf" in conf and "authorization" in auth and "$NATS_GRIZZLY_PASSWORD" in auth,
               f"{name}: NATS clients must authenticate (auth.conf, passwords from the environment)")
        headless = sts["spec"]["serviceName"]
        routes = re.findall(r"nats://([\w.-]+):6222", conf)
        want = [f"{sts['metadata']['name']}-{i}.{headless}" for i in range(replicas)]
        result(routes == want, f"{name}: cluster routes name every server", f"routes={routes} want={want}")
        pvc = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
        mfs = re.search(r"^\s*max_file_store:\s*(\S+)", limits, re.M)
        if result("data" in pvc and mfs is not None, f"{name}: JetStream on a persistent volume with max_file_store"):
            volume = k8s_bytes(pvc["data"]["spec"]["resources"]["requests"]["storage"])
            store = nats_bytes(mfs.group(1))
            streams = sum(int(env.get(f"GRIZZLY_STREAMS__{s}_MAX_BYTES", "0")) for s in ("EVENTS", "TASKS", "DLQ"))
            kv_room = 256 * 2**20
            result(0 < streams + kv_room <= store <= volume,
                   f"{name}: streams ({streams >> 20} MiB) + KV room <= max_file_store ({store >> 20} MiB) <= volume ({volume >> 20} MiB)")
            stream_replicas = int(env.get("GRIZZLY_STREAMS__REPLICAS", "1"))
            result(1 <= stream_replicas <= replicas, f"{name}: stream replicas ({stream_replicas}) <= NATS servers ({replicas})")
            if name.startswith(("prod", "region")):
                result(stream_replicas == 3, f"{name}: production streams are replicated x3 (GRIZZLY_STREAMS__REPLICAS=3)")

    # Autoscaling: at most one autoscaler for the worker; triggers match handlers x partitions.
    scaled = [d for d in find(docs, "ScaledObject") if d["spec"]["scaleTargetRef"]["name"] == "grizzly-worker"]
    hpas = [d for d in find(docs, "HorizontalPodAutoscaler") if d["spec"]["scaleTargetRef"]["name"] == "grizzly-worker"]
    result(len(scaled) + len(hpas) <= 1, f"{name}: at most one autoscaler for grizzly-worker",
           f"{len(scaled)} ScaledObject, {len(hpas)} HPA")
    worker = deployments.get("grizzly-worker")
    if scaled and worker:
        so = scaled[0]
        paused = so["metadata"].get("annotations", {}).get("autoscaling.keda.sh/paused-replicas")
        if paused is None:
            result("replicas" not in worker["spec"], f"{name}: worker replica count left to KEDA (no spec.replicas)")
        else:
            result(worker["spec"].get("replicas") == int(paused),
                   f"{name}: paused ScaledObject and worker replicas agree ({paused})")
        triggers = so["spec"]["triggers"]
        bad_meta = [f"{t.get('name')}: {sorted(set(t['metadata']) - NATS_JETSTREAM_METADATA)}"
                    for t in triggers if set(t["metadata"]) - NATS_JETSTREAM_METADATA]
        result(all(t["type"] == "nats-jetstream" for t in triggers) and not bad_meta,
               f"{name}: KEDA triggers are nats-jetstream with known metadata keys", "; ".join(bad_meta))
        consumers = sorted(t["metadata"].get("consumer", "") for t in triggers)
        want = sorted(f"worker-{h}-{p}" for h in handler_names for p in range(partitions))
        result(consumers == want and all(t["metadata"].get("stream") == "TASKS" for t in triggers),
               f"{name}: KEDA triggers cover every worker consumer on TASKS ({len(handler_names)} handlers x {partitions} partitions)",
               f"missing {sorted(set(want) - set(consumers))}, extra {sorted(set(consumers) - set(want))}")
        nats_svc = one(docs, "Service", "nats")
        endpoint = f"nats.{nats_svc['metadata']['namespace']}.svc:8222" if nats_svc else "?"
        result(all(t["metadata"].get("natsServerMonitoringEndpoint") == endpoint for t in triggers),
               f"{name}: KEDA reads the NATS monitoring endpoint {endpoint}")
        result(so["spec"].get("maxReplicaCount", 100) <= partitions,
               f"{name}: KEDA maxReplicaCount <= partitions ({partitions})")
    if hpas and worker:
        result("replicas" not in worker["spec"], f"{name}: worker replica count left to the HPA (no spec.replicas)")
        result(hpas[0]["spec"]["maxReplicas"] <= partitions, f"{name}: HPA maxReplicas <= partitions ({partitions})")

    # Network policies: default deny, NATS client port only between components and NATS.
    nps = {d["metadata"]["name"]: d for d in find(docs, "NetworkPolicy")}
    deny = nps.get("default-deny", {}).get("spec", {})
    result(deny.get("podSelector") == {} and set(deny.get("policyTypes", [])) == {"Ingress", "Egress"}
           and not deny.get("ingress"), f"{name}: default-deny NetworkPolicy for the namespace")
    comp_np = nps.get("grizzly-components", {}).get("spec", {})
    egress_ports = {p["port"] for rule in comp_np.get("egress", []) for p in rule.get("ports", [])}
    result(egress_ports == {4222}, f"{name}: components may reach only the NATS client port", f"ports={egress_ports}")
    result(not find(docs, "Secret"), f"{name}: no Secret in the manifests (created out of band)")


def cmd_manifests(out: Path, rendered: list[Path]) -> None:
    known = settings_env_names()
    npm_prefix = os.environ["K8S_NPM_PREFIX"]
    with tempfile.TemporaryDirectory() as scratch:
        for path in rendered:
            name = path.stem if path.parent == out else str(path.relative_to(ROOT))
            docs = load_docs(path)
            validate_builtin(name, docs)
            validate_custom(name, docs, npm_prefix, Path(scratch))
            if path.parent == out:
                check_grizzly_rules(name, docs, known)
    example = load_docs(K8S / "secret.example.yaml")
    result(all("REPLACE" in v for d in example for v in d.get("stringData", {}).values()),
           "k8s/secret.example.yaml holds only a placeholder")


# --- NATS configuration ------------------------------------------------------------------

def make_test_tls(directory: Path) -> None:
    """A throwaway CA and certificate, so that configs naming TLS files can be loaded."""
    def run(*args):
        subprocess.run(args, cwd=directory, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=grizzly-validate-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "tls.key", "-out", "tls.csr")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth,clientAuth\n")
    run("openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "tls.crt")


def cmd_nats_config(out: Path, rendered: list[Path]) -> None:
    nats = os.environ["NATS_SERVER"]
    with tempfile.TemporaryDirectory() as scratch:
        tls = Path(scratch) / "tls"
        tls.mkdir()
        make_test_tls(tls)
        for path in rendered:
            cm = configmap(load_docs(path), "nats-config")
            conf_dir = Path(scratch) / path.stem
            conf_dir.mkdir()
            for key, text in cm["data"].items():
                (conf_dir / key).write_text(text.replace("/etc/nats-tls/leafnode", str(tls)))
            run = subprocess.run([nats, "-c", str(conf_dir / "nats.conf"), "-t"], capture_output=True, text=True,
                                 env={**os.environ, "POD_NAME": "nats-0", "NATS_GRIZZLY_PASSWORD": "x",
                                      "NATS_PUBLISHER_PASSWORD": "y"}, timeout=60)
            result(run.returncode == 0, f"{path.stem}: nats-server -t accepts the NATS configuration",
                   (run.stderr or run.stdout).strip())


# --- alert rule coverage ------------------------------------------------------------------------

def cmd_alert_coverage(rules_path: Path, tests_dir: Path) -> None:
    rules = yaml.safe_load(rules_path.read_text())["groups"]
    alerts = {r["alert"] for g in rules for r in g["rules"] if "alert" in r}
    records = {r["record"] for g in rules for r in g["rules"] if "record" in r}
    fired, queried = set(), ""
    for test_file in sorted(tests_dir.glob("*.yaml")):
        for t in yaml.safe_load(test_file.read_text()).get("tests", []):
            for a in t.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    fired.add(a["alertname"])
            for q in t.get("promql_expr_test", []):
                queried += " " + q["expr"]
    untested = sorted(alerts - fired) + sorted(r for r in records if r not in queried)
    result(not untested, f"every rule in {rules_path.name} has a unit test that exercises it ({len(alerts)} alerts, {len(records)} recording rules)",
           f"untested: {', '.join(untested)}")


def main(argv: list[str]) -> int:
    cmd, args = argv[1], argv[2:]
    if cmd == "sync-handlers":
        cmd_sync_handlers("--fix" in args)
    elif cmd == "manifests":
        cmd_manifests(Path(args[0]), [Path(a) for a in args[1:]])
    elif cmd == "nats-config":
        cmd_nats_config(Path(args[0]), [Path(a) for a in args[1:]])
    elif cmd == "alert-coverage":
        cmd_alert_coverage(Path(args[0]), Path(args[1]))
    elif cmd == "extract-rules":
        doc = yaml.safe_load(Path(args[0]).read_text())
        Path(args[1]).write_text(yaml.safe_dump(doc["spec"], sort_keys=False))
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
