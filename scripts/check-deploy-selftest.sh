#!/usr/bin/env bash
# Proves that scripts/check-deploy.sh catches mistakes: in a scratch copy of
# deploy/ (the rest of the repository linked in), it breaks one thing at a
# time, runs the check, and expects it to fail naming the problem.
# Run scripts/check-deploy.sh first (it installs the tools this reuses).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cp -r deploy scripts .dockerignore "$scratch/"
for p in Cargo.toml Cargo.lock proto crates tests bench target; do
  ln -s "$root/$p" "$scratch/$p"
done
export GATEHOUSE_BIN_DIR=${GATEHOUSE_BIN_DIR:-$root/target/debug}

failures=0
# mutate FILE 'PYTHON EXPRESSION ON s' 'TEXT THE CHECK MUST PRINT' 'WHAT IS BROKEN'
mutate() {
  local file=$1 expr=$2 expect=$3 what=$4 out
  cp "$scratch/$file" "$scratch/$file.orig"
  python3 -c "import sys; p=sys.argv[1]; s=open(p).read(); t=$expr; assert t != s, 'mutation changed nothing'; open(p,'w').write(t)" "$scratch/$file"
  if out=$(bash "$scratch/scripts/check-deploy.sh" 2>&1); then
    printf '  MISSED  %s\n' "$what"; failures=$((failures + 1))
  elif ! grep -qF -- "$expect" <<<"$out"; then
    printf '  WRONG   %s: failed without saying %q\n%s\n' "$what" "$expect" "$out"; failures=$((failures + 1))
  else
    printf '  caught  %s\n' "$what"
  fi
  mv "$scratch/$file.orig" "$scratch/$file"
}

D=deploy/docker/Dockerfile C=deploy/compose/compose.yaml
CP=deploy/kubernetes/control-plane.yaml DP=deploy/kubernetes/data-plane.yaml
NP=deploy/kubernetes/network-policies.yaml

mutate $D 's.replace("USER 65532:65532", "USER root")' "DL3002" "Dockerfile runs as root"
mutate $D 's.replace("WORKDIR /var/lib/gatehouse", "RUN apt-get install curl\nWORKDIR /var/lib/gatehouse")' "DL3008" "Dockerfile apt-get without pinned versions"
mutate $D 's.replace("COPY bench ./bench", "COPY benches ./benches")' "not in the build context" "Dockerfile COPY of a missing path"
mutate .dockerignore 's + "proto\n"' "excluded by .dockerignore" ".dockerignore drops a path the build copies"
mutate $C 's.replace("GATEHOUSE_NODE_ID: \"2\"", "GATEHOUSE_NODEID: \"2\"")' "does not read GATEHOUSE_NODEID" "compose: misspelt variable"
mutate $C 's.replace("command: [\"control-plane\", \"--insecure\"]\n    environment:\n      GATEHOUSE_NODE_ID: \"3\"", "command: [\"control-plane\"]\n    environment:\n      GATEHOUSE_NODE_ID: \"3\"")' "refuses to start without --insecure" "compose: private address without --insecure"
mutate $C 's.replace("\"127.0.0.1:9091:9090\"", "\"9400:9400\"")' "publish on 127.0.0.1 only" "compose: admin port published on every interface"
mutate $C 's.replace("      - echo\n", "      - ech0\n", 1)' "depends_on unknown service" "compose: unknown service in depends_on"
mutate $C 's.replace("\nservices:", "\nservice:")' "compose-spec" "compose: unknown top-level key"
mutate $C 's.replace("ipv4_address: 172.29.80.13", "ipv4_address: 172.29.90.13")' "outside the subnet" "compose: fixed address outside its subnet"
mutate $CP 's.replace("readinessProbe:", "readinesProbe:")' "readinesProbe" "StatefulSet: misspelt field"
mutate $CP 's.replace("replicas: 3", "replicas: \"3\"")' "not of type" "StatefulSet: replicas as a string"
mutate $CP 's.replace("\"$(POD_IP):9401\"", "\"$(POD_IPP):9401\"")' "not defined before it" "StatefulSet: undefined \$(VAR) in env"
mutate $CP 's.replace("args: [\"control-plane\", \"--insecure\"]", "args: [\"control-plane\", \"--insecure\", \"--bootstrapp\"]")' "has no flag --bootstrapp" "StatefulSet: unknown flag"
mutate $DP 's.replace("path: /readyz", "path: /ready")' "readinessProbe should be GET /readyz" "Deployment: readiness probe off /readyz"
mutate $DP 's.replace("targetPort: https", "targetPort: htps")' "targetPort 'htps'" "Service: targetPort names no container port"
mutate $DP 's.replace("    name: gatehouse-dp\n  minReplicas", "    name: gatehouse-dataplane\n  minReplicas")' "scaleTargetRef" "HPA: unknown scale target"
mutate $DP 's.replace("  maxUnavailable: 1\n  selector:", "  maxUnavailable: 1\n  maxUnavailable: 2\n  selector:")' "duplication of key" "PDB: duplicate key"
mutate $NP 's.replace("        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: gatehouse\n              app.kubernetes.io/component: data-plane\n", "", 1).replace("    - from:\n        - podSelector:\n            matchLabels:\n              gatehouse.dev/admin-client: \"true\"\n", "    - from: []\n", 1)' "open to every source" "NetworkPolicy: admin port open to all"
mutate $DP 's.replace("            # Role data_plane (`gatehousectl tokens create NAME --role data_plane`).\n            - name: GATEHOUSE_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: gatehouse-data-plane-token\n                  key: token\n", "")' "is given no token" "Deployment: data plane without a token"
mutate $C 's.replace("      GATEHOUSE_TOKEN_FILE: /run/secrets/data_plane_token\n    secrets:\n      - data_plane_token\n    volumes:\n      - dp-2-state", "    volumes:\n      - dp-2-state")' "is given no token" "compose: data plane without a token"
mutate $DP 's.replace("            - name: GATEHOUSE_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: gatehouse-data-plane-token\n                  key: token\n", "            - name: GATEHOUSE_TOKEN\n              value: ght_" + "a1B2" * 10 + "\n")' "must come from a Secret" "Deployment: token as a literal value"
mutate $CP 's.replace("- name: GATEHOUSE_BOOTSTRAP_TOKEN\n", "- name: GATEHOUSE_BOOTSTRAP_SECRET\n")' "does not read GATEHOUSE_BOOTSTRAP_SECRET" "StatefulSet: misspelt token variable"
mutate $CP 's.replace("name: gatehouse-bootstrap-token", "name: gatehouse-bootstrap", 1)' "does not tell how to create" "StatefulSet: token Secret the README does not create"
mutate $C 's.replace("GATEHOUSE_BOOTSTRAP_TOKEN_FILE: /run/secrets/bootstrap_token\n    secrets:\n      - bootstrap_token\n    volumes:\n      - cp-3-data", "GATEHOUSE_BOOTSTRAP_TOKEN_FILE: /run/secrets/bootstrap.token\n    secrets:\n      - bootstrap_token\n    volumes:\n      - cp-3-data")' "no secret of this service is mounted there" "compose: token file path that no secret provides"
mutate $C 's.replace("      GATEHOUSE_SERVER: cp-1:9400\n", "      GATEHOUSE_SERVER: cp-1:9400\n      GATEHOUSE_TOKEN: changeme\n")' "puts a token in the compose file" "compose: token value in the file"
mutate deploy/compose/secrets/.gitignore 's.replace("*.token", "*.tok")' "not ignored by a .gitignore" "compose: secret file git would commit"
mutate deploy/compose/gateway/echo.yaml 's.replace("    upstream: echo\n    policy", "    upstream: echo-v2\n    policy")' "references unknown upstream" "sample config: unknown upstream"

if ((failures)); then
  echo "check-deploy-selftest: $failures mistake(s) not caught" >&2
  exit 1
fi
echo "check-deploy-selftest: every mistake was caught"
