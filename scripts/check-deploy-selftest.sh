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

# plant FILE 'CONTENT' 'TEXT THE CHECK MUST PRINT' 'WHAT IS BROKEN': a new file
# (TEXT empty: the check must pass, for a file it must leave alone).
plant() {
  local file=$1 content=$2 expect=$3 what=$4 out
  mkdir -p "$(dirname "$scratch/$file")"
  printf '%s\n' "$content" >"$scratch/$file"
  if out=$(bash "$scratch/scripts/check-deploy.sh" 2>&1); then
    if [[ -z $expect ]]; then
      printf '  passed  %s\n' "$what"
    else
      printf '  MISSED  %s\n' "$what"; failures=$((failures + 1))
    fi
  elif [[ -z $expect ]]; then
    printf '  WRONG   %s: should pass\n%s\n' "$what" "$out"; failures=$((failures + 1))
  elif ! grep -qF -- "$expect" <<<"$out"; then
    printf '  WRONG   %s: failed without saying %q\n%s\n' "$what" "$expect" "$out"; failures=$((failures + 1))
  else
    printf '  caught  %s\n' "$what"
  fi
  rm -f "$scratch/$file"
}

D=deploy/docker/Dockerfile C=deploy/compose/compose.yaml
CP=deploy/kubernetes/control-plane.yaml DP=deploy/kubernetes/data-plane.yaml
NP=deploy/kubernetes/network-policies.yaml

mutate $D 's.replace("USER 65532:65532", "USER root")' "DL3002" "Dockerfile runs as root"
mutate $D 's.replace("WORKDIR /var/lib/gatehouse", "RUN apt-get install curl\nWORKDIR /var/lib/gatehouse")' "DL3008" "Dockerfile apt-get without pinned versions"
mutate $D 's.replace("COPY bench ./bench", "COPY benches ./benches")' "not in the build context" "Dockerfile COPY of a missing path"
mutate .dockerignore 's + "proto\n"' "excluded by .dockerignore" ".dockerignore drops a path the build copies"
mutate $C 's.replace("GATEHOUSE_NODE_ID: \"2\"", "GATEHOUSE_NODEID: \"2\"")' "does not read GATEHOUSE_NODEID" "compose: misspelt variable"
mutate $C 's.replace("      GATEHOUSE_TLS_CERT: /run/secrets/cp_3_cert\n      GATEHOUSE_TLS_KEY: /run/secrets/cp_3_key\n      GATEHOUSE_TLS_CA: /run/secrets/ca_cert\n", "")' "refuses to start without TLS" "compose: control plane on a private address without TLS or --insecure"
mutate $C 's.replace("      GATEHOUSE_TLS_KEY: /run/secrets/cp_2_key\n", "")' "needs all three TLS files or none" "compose: control plane with two of the three TLS files"
mutate $C 's.replace("command: [\"control-plane\"]\n    environment:\n      GATEHOUSE_NODE_ID: \"2\"", "command: [\"control-plane\", \"--insecure\"]\n    environment:\n      GATEHOUSE_NODE_ID: \"2\"")' "--insecure with TLS" "compose: control plane with TLS and a needless --insecure"
mutate $C 's.replace("    # --insecure: as dp-1 (plaintext proxy and ops listeners).\n    command: [\"data-plane\", \"--insecure\"]", "    command: [\"data-plane\"]")' "refuses to start without --insecure (a plaintext listener)" "compose: data plane with plaintext listeners on a private address, no --insecure"
mutate $C 's.replace("      GATEHOUSE_CA: /run/secrets/ca_cert\n      GATEHOUSE_CERT", "      GATEHOUSE_CERT")' "gatehousectl needs GATEHOUSE_CA" "compose: ctl without the CA against a TLS control plane"
mutate $C 's.replace("\"127.0.0.1:9091:9090\"", "\"9400:9400\"")' "publish on 127.0.0.1 only" "compose: admin port published on every interface"
mutate $C 's.replace("      - echo\n", "      - ech0\n", 1)' "depends_on unknown service" "compose: unknown service in depends_on"
mutate $C 's.replace("\nservices:", "\nservice:")' "compose-spec" "compose: unknown top-level key"
mutate $C 's.replace("ipv4_address: 172.29.80.13", "ipv4_address: 172.29.90.13")' "outside the subnet" "compose: fixed address outside its subnet"
mutate $CP 's.replace("readinessProbe:", "readinesProbe:")' "readinesProbe" "StatefulSet: misspelt field"
mutate $CP 's.replace("replicas: 3", "replicas: \"3\"")' "not of type" "StatefulSet: replicas as a string"
mutate $CP 's.replace("\"$(POD_IP):9401\"", "\"$(POD_IPP):9401\"")' "not defined before it" "StatefulSet: undefined \$(VAR) in env"
mutate $CP 's.replace("args: [\"control-plane\"]", "args: [\"control-plane\", \"--bootstrapp\"]")' "has no flag --bootstrapp" "StatefulSet: unknown flag"
mutate $CP 's.replace("            - name: GATEHOUSE_TLS_CA\n              value: /etc/gatehouse/ca.pem\n", "")' "refuses to start without TLS" "StatefulSet: pod IP with two of the three TLS files"
mutate $CP 's.replace("              value: /etc/gatehouse/secrets.key", "              value: /var/lib/gatehouse/secrets.key")' "not backed by a Secret" "StatefulSet: secrets key file outside the Secret volume"
mutate $DP 's.replace("path: /readyz", "path: /ready")' "readinessProbe should be GET /readyz" "Deployment: readiness probe off /readyz"
mutate $DP 's.replace("targetPort: https", "targetPort: htps")' "targetPort 'htps'" "Service: targetPort names no container port"
mutate $DP 's.replace("    name: gatehouse-dp\n  minReplicas", "    name: gatehouse-dataplane\n  minReplicas")' "scaleTargetRef" "HPA: unknown scale target"
mutate $DP 's.replace("  maxUnavailable: 1\n  selector:", "  maxUnavailable: 1\n  maxUnavailable: 2\n  selector:")' "duplication of key" "PDB: duplicate key"
mutate $NP 's.replace("        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: gatehouse\n              app.kubernetes.io/component: data-plane\n", "", 1).replace("    - from:\n        - podSelector:\n            matchLabels:\n              gatehouse.dev/admin-client: \"true\"\n", "    - from: []\n", 1)' "open to every source" "NetworkPolicy: admin port open to all"
mutate $DP 's.replace("            - name: GATEHOUSE_CONTROL_PLANE_CERT\n              value: /etc/gatehouse/tls.crt\n            - name: GATEHOUSE_CONTROL_PLANE_KEY\n              value: /etc/gatehouse/tls.key\n", "")' "is given no credential" "Deployment: data plane without a client certificate or token"
mutate $C 's.replace("      GATEHOUSE_CONTROL_PLANE_CERT: /run/secrets/dp_2_cert\n      GATEHOUSE_CONTROL_PLANE_KEY: /run/secrets/dp_2_key\n", "")' "is given no credential" "compose: data plane without a client certificate or token"
mutate $DP 's.replace("            - name: GATEHOUSE_CONTROL_PLANE_CERT\n              value: /etc/gatehouse/tls.crt\n            - name: GATEHOUSE_CONTROL_PLANE_KEY\n              value: /etc/gatehouse/tls.key\n", "            - name: GATEHOUSE_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: gatehouse-bootstrap-token\n                  key: token\n")' "accepts only a client certificate" "Deployment: data plane watching a TLS control plane with a token"
mutate $DP 's.replace("            - name: GATEHOUSE_CONTROL_PLANE_CA\n              value: /etc/gatehouse/ca.pem\n            - name: GATEHOUSE_CONTROL_PLANE_CERT\n              value: /etc/gatehouse/tls.crt\n            - name: GATEHOUSE_CONTROL_PLANE_KEY\n              value: /etc/gatehouse/tls.key\n", "            - name: GATEHOUSE_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: gatehouse-bootstrap-token\n                  key: token\n")' "in plaintext, which serves TLS" "Deployment: data plane in plaintext against a TLS control plane"
mutate $DP 's.replace("              value: /etc/gatehouse/tls.key", "              value: /etc/gatehouse/tls.pem")' "holds no 'tls.pem'" "Deployment: client key path the Secret volume does not map"
mutate $DP 's.replace("name: gatehouse-dp-tls", "name: gatehouse-dataplane-tls")' "does not tell how to create" "Deployment: certificate Secret the README does not create"
mutate $CP 's.replace("            - name: GATEHOUSE_BOOTSTRAP_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: gatehouse-bootstrap-token\n                  key: token\n", "            - name: GATEHOUSE_BOOTSTRAP_TOKEN\n              value: ght_" + "a1B2" * 10 + "\n")' "must come from a Secret" "StatefulSet: token as a literal value"
mutate $CP 's.replace("- name: GATEHOUSE_BOOTSTRAP_TOKEN\n", "- name: GATEHOUSE_BOOTSTRAP_SECRET\n")' "does not read GATEHOUSE_BOOTSTRAP_SECRET" "StatefulSet: misspelt token variable"
mutate $CP 's.replace("name: gatehouse-bootstrap-token", "name: gatehouse-bootstrap", 1)' "does not tell how to create" "StatefulSet: token Secret the README does not create"
mutate $C 's.replace("      GATEHOUSE_TLS_KEY: /run/secrets/cp_3_key\n", "      GATEHOUSE_TLS_KEY: /run/secrets/cp_3.key\n")' "no secret of this service is mounted there" "compose: key file path that no secret provides"
mutate $C 's.replace("    secrets:\n      - cp_1_cert\n      - cp_1_key\n", "    secrets:\n      - cp_1_cert\n")' "no secret of this service is mounted there" "compose: key secret not mounted in its service"
mutate $C 's.replace("      GATEHOUSE_SERVER: cp-1:9400\n", "      GATEHOUSE_SERVER: cp-1:9400\n      GATEHOUSE_TOKEN: changeme\n")' "puts a secret in the compose file" "compose: token value in the file"
mutate $C 's.replace("      GATEHOUSE_SECRETS_KEY_FILE: /run/secrets/secrets_key\n    secrets:\n      - ca_cert\n      - dp_2_cert", "      GATEHOUSE_SECRETS_KEY: " + "0f" * 32 + "\n    secrets:\n      - ca_cert\n      - dp_2_cert")' "puts a secret in the compose file" "compose: secrets key value in the file"
mutate deploy/compose/secrets/.gitignore 's.replace("*.token", "*.tok")' "not ignored by a .gitignore" "compose: token file git would commit"
mutate deploy/compose/secrets/.gitignore 's.replace("*.pem\n", "").replace("certs/\n", "")' "not ignored by a .gitignore" "compose: certificate and key files git would commit"
plant deploy/kubernetes/gatehouse-dp-key.pem "$(printf -- '-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----')" "looks like a private key" "a private key committed under deploy/"
plant deploy/compose/gateway/secrets.txt "$(printf '%s' "$(python3 -c 'print("9c" * 32)')")" "looks like a token or key" "a secrets key committed under deploy/"
plant deploy/kubernetes/secrets.key "placeholder" "named like a token or key" "a file named like a key, not ignored"
plant deploy/compose/secrets/certs/cp-1-key.pem "$(printf -- '-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----')" "" "a local private key where git ignores it (no false alarm)"
mutate deploy/compose/gateway/echo.yaml 's.replace("    upstream: echo\n    policy", "    upstream: echo-v2\n    policy")' "references unknown upstream" "sample config: unknown upstream"

if ((failures)); then
  echo "check-deploy-selftest: $failures mistake(s) not caught" >&2
  exit 1
fi
echo "check-deploy-selftest: every mistake was caught"
