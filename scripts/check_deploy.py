#!/usr/bin/env python3
"""Consistency checks of deploy/ that schema validation cannot see.

Run by scripts/check-deploy.sh (with the venv's Python, which has PyYAML).
The schemas say a file is well formed; this says it fits Gatehouse and
itself:

- every `--flag` and `GATEHOUSE_*` variable given to `gatehouse` or
  `gatehousectl` exists for that subcommand (an unknown variable is silently
  ignored by the binary, so a typo would go unnoticed). Checked against the
  binaries' own --help when they are built (GATEHOUSE_BIN_DIR, default
  target/debug), else against the `env = "..."` names in the sources. The
  token variables (GATEHOUSE_TOKEN, GATEHOUSE_BOOTSTRAP_TOKEN) are read
  outside clap: their names come from the help text that mentions them, or
  from the string literals of tokens.rs and gatehousectl's sources;
- a control-plane node given a non-loopback listen address has TLS (all
  three of --tls-cert/--tls-key/--tls-ca, or their variables) or
  --insecure, and a data plane whose plaintext proxy or ops listener is not
  loopback has --insecure (each refuses to start otherwise); admin (9400)
  and Raft (9401) ports are never published or exposed outside the private
  network;
- every data plane has a credential for the config stream: a client
  certificate (--control-plane-cert/-key with --control-plane-ca) or a
  token (GATEHOUSE_TOKEN, GATEHOUSE_TOKEN_FILE or --token-file). One that
  watches over TLS needs the certificate (a control plane with TLS refuses
  tokens on the stream), and data planes use TLS exactly when the control
  plane they watch does;
- tokens, keys and certificates come from secrets, never from the files:
  variables holding a token or the secrets key itself come from a Secret
  (Kubernetes secretKeyRef) and never carry a value in compose; variables
  naming a token, key or certificate file name a compose secret mounted in
  that service, or a file in a Kubernetes Secret volume; every Secret
  the manifests use is one the README tells how to create (no Secret object
  in the manifests), and compose secret files are ignored by git;
- no file under deploy/ that git would commit holds a private key, an
  admin token, an API key or a secrets key, or is named like one
  (`*.token`, `*.key`, `*-key.pem`);
- `$(VAR)` in a Kubernetes env value names a variable defined before it
  (Kubernetes leaves it as literal text otherwise);
- selectors, named ports, scale targets and kustomize resources resolve;
- compose references (depends_on, networks, volumes) resolve, fixed
  addresses sit in their network's subnet, ports publish on 127.0.0.1 only;
- the Dockerfile's COPY sources exist and are not excluded by .dockerignore,
  the runtime stage runs as a non-root user, has no HEALTHCHECK and exposes
  the default ports.

Exit status 1 with one line per problem, 0 when all is well.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROBLEMS: list[str] = []
NOTES: list[str] = []

ADMIN_PORT, RAFT_PORT = 9400, 9401
# Variables that configure a listen address, per subcommand, and whether a
# non-loopback value needs --insecure (the TLS listener does not).
LISTEN_VARS = {
    "control-plane": {"GATEHOUSE_ADMIN_LISTEN": True, "GATEHOUSE_RAFT_LISTEN": True},
    "data-plane": {
        "GATEHOUSE_LISTEN": True,
        "GATEHOUSE_OPS_LISTEN": True,
        "GATEHOUSE_TLS_LISTEN": False,
    },
}


def problem(where: str, msg: str) -> None:
    PROBLEMS.append(f"{where}: {msg}")


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ---------------------------------------------------------------------------
# What the binaries accept


class Cli:
    """Flags and env vars per subcommand: {'control-plane': (flags, envs), ...}."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[set[str], set[str]]] = {}
        self.source = ""
        bin_dir = Path(os.environ.get("GATEHOUSE_BIN_DIR", ROOT / "target" / "debug"))
        gh, ctl = bin_dir / "gatehouse", bin_dir / "gatehousectl"
        if gh.is_file() and ctl.is_file():
            self.source = f"--help of the binaries in {bin_dir}"
            for sub in ("control-plane", "data-plane", "standalone"):
                self.known[sub] = self._from_help([str(gh), sub, "--help"])
            self.known["gatehousectl"] = self._from_help([str(ctl), "--help"])
            for sub in ("apply", "get", "delete", "validate"):
                self._merge("gatehousectl", self._from_help([str(ctl), sub, "--help"]))
            for sub in ("status", "init", "add", "remove"):
                self._merge("gatehousectl", self._from_help([str(ctl), "cluster", sub, "--help"]))
            for sub in ("create", "revoke", "list"):
                self._merge("gatehousectl", self._from_help([str(ctl), "keys", sub, "--help"]))
                self._merge("gatehousectl", self._from_help([str(ctl), "tokens", sub, "--help"]))
            self._merge("gatehousectl", self._from_help([str(ctl), "audit", "--help"]))
        else:
            # Without binaries only the variable names can be read reliably.
            self.source = "env = \"...\" names in crates/gatehouse*/src (no binaries built)"
            envs_of = lambda files: {  # noqa: E731
                m
                for f in files
                for m in re.findall(r'env\s*=\s*"(GATEHOUSE_[A-Z0-9_]+)"', f.read_text())
            }
            src = ROOT / "crates" / "gatehouse" / "src"
            main_envs = envs_of([src / "main.rs"])
            dp_envs = envs_of([src / "data_plane.rs"])
            globals_ = {"GATEHOUSE_LOG_FORMAT", "GATEHOUSE_LOG_LEVEL"}
            cp_only = main_envs - globals_
            self.known["control-plane"] = (set(), cp_only | globals_)
            self.known["data-plane"] = (set(), dp_envs | globals_)
            self.known["standalone"] = (set(), dp_envs | globals_)
            # Tokens are read from the environment directly, not through clap
            # (tokens.rs: GATEHOUSE_BOOTSTRAP_TOKEN, GATEHOUSE_TOKEN; gatehousectl:
            # std::env::var("GATEHOUSE_TOKEN")).
            literals = lambda files: {  # noqa: E731
                m for f in files for m in re.findall(r'"(GATEHOUSE_[A-Z0-9_]+)"', f.read_text())
            }
            token_envs = literals([src / "tokens.rs"])
            for sub in ("control-plane", "data-plane", "standalone"):
                self.known[sub] = (set(), self.known[sub][1] | token_envs)
            ctl_src = sorted((ROOT / "crates" / "gatehousectl" / "src").glob("*.rs"))
            self.known["gatehousectl"] = (set(), envs_of(ctl_src) | literals(ctl_src))
        self.check_flags = bool(self.known["control-plane"][0])

    @staticmethod
    def _from_help(cmd: list[str]) -> tuple[set[str], set[str]]:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))
        envs = set(re.findall(r"\[env: ([A-Z0-9_]+)=", out))
        # Variables read outside clap are named in the help text instead, e.g.
        # "GATEHOUSE_TOKEN, when set, wins" under --token-file.
        envs |= set(re.findall(r"\b(GATEHOUSE_[A-Z0-9_]*[A-Z0-9])\b", out))
        return flags, envs

    def _merge(self, key: str, more: tuple[set[str], set[str]]) -> None:
        flags, envs = self.known[key]
        self.known[key] = (flags | more[0], envs | more[1])

    def check(self, where: str, sub: str, args: list[str], envs: list[str]) -> None:
        if sub not in self.known:
            problem(where, f"unknown gatehouse subcommand {sub!r}")
            return
        flags, known_envs = self.known[sub]
        # gatehousectl shares the image and the container's environment
        # (`kubectl exec POD -- gatehousectl ...`), so its variables are fine too.
        known_envs = known_envs | self.known["gatehousectl"][1]
        if self.check_flags:
            for a in args:
                if a.startswith("--"):
                    name = a.split("=", 1)[0]
                    if name not in flags:
                        problem(where, f"`{sub}` has no flag {name} (known: {', '.join(sorted(flags))})")
        for e in envs:
            if e.startswith("GATEHOUSE_") and e not in known_envs:
                problem(
                    where,
                    f"`{sub}` does not read {e}; it would be silently ignored "
                    f"(known: {', '.join(sorted(known_envs))})",
                )


def host_of(addr: str) -> str:
    """The host part of ip:port, [v6]:port, or $(VAR):port."""
    if addr.startswith("["):
        return addr[1 : addr.index("]")]
    return addr.rsplit(":", 1)[0]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def given(args: list[str], env: dict[str, str], var: str, flag: str) -> bool:
    """Whether a setting is given as a variable or a flag."""
    return var in env or any(a == flag or a.startswith(flag + "=") for a in args)


# The files that turn TLS on, per subcommand: (variable, flag).
TLS_SETTINGS = {
    "control-plane": [
        ("GATEHOUSE_TLS_CERT", "--tls-cert"),
        ("GATEHOUSE_TLS_KEY", "--tls-key"),
        ("GATEHOUSE_TLS_CA", "--tls-ca"),
    ],
}


def has_tls(sub: str, args: list[str], env: dict[str, str]) -> bool:
    """A control-plane node with all three TLS files (a problem is reported for some but not all)."""
    settings = TLS_SETTINGS.get(sub, [])
    return bool(settings) and all(given(args, env, v, f) for v, f in settings)


def check_insecure(where: str, sub: str, args: list[str], env: dict[str, str]) -> None:
    insecure = "--insecure" in args or env.get("GATEHOUSE_INSECURE") == "true"
    settings = TLS_SETTINGS.get(sub, [])
    have = [v for v, f in settings if given(args, env, v, f)]
    if have and len(have) != len(settings):
        missing = [v for v, _ in settings if v not in have]
        problem(where, f"{', '.join(have)} without {', '.join(missing)}: `{sub}` needs all three TLS files or none")
    tls = has_tls(sub, args, env)
    for var, plaintext in LISTEN_VARS.get(sub, {}).items():
        flag = "--" + var.removeprefix("GATEHOUSE_").lower().replace("_", "-")
        value = env.get(var)
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(flag + "="):
                value = a.split("=", 1)[1]
        if value is None or not plaintext:
            continue
        host = host_of(value)
        if host in ("0.0.0.0", "::"):
            problem(where, f"{var}={value}: bind a private address, not every interface")
        if is_loopback(host) or insecure:
            continue
        if sub == "control-plane" and not tls:
            problem(
                where,
                f"{var}={value} is not loopback: `{sub}` refuses to start without TLS "
                "(--tls-cert, --tls-key, --tls-ca) or --insecure",
            )
        elif sub == "data-plane":
            problem(where, f"{var}={value} is not loopback: `{sub}` refuses to start without --insecure (a plaintext listener)")
    if sub == "control-plane" and tls and insecure:
        problem(where, "--insecure with TLS: not needed, and it would hide a lost TLS setting later; drop it")


def check_credential(where: str, sub: str, args: list[str], env: dict[str, str]) -> None:
    """A data plane's credential for the config stream: a client certificate or a token."""
    if sub != "data-plane":
        return
    ca = given(args, env, "GATEHOUSE_CONTROL_PLANE_CA", "--control-plane-ca")
    cert = given(args, env, "GATEHOUSE_CONTROL_PLANE_CERT", "--control-plane-cert")
    key = given(args, env, "GATEHOUSE_CONTROL_PLANE_KEY", "--control-plane-key")
    token = "GATEHOUSE_TOKEN" in env or given(args, env, "GATEHOUSE_TOKEN_FILE", "--token-file")
    if cert != key:
        problem(where, "GATEHOUSE_CONTROL_PLANE_CERT and GATEHOUSE_CONTROL_PLANE_KEY go together")
    if (cert or key) and not ca:
        problem(where, "a client certificate needs GATEHOUSE_CONTROL_PLANE_CA (the cluster CA)")
    if not (cert and key) and not token:
        problem(
            where,
            f"`{sub}` is given no credential: a client certificate (GATEHOUSE_CONTROL_PLANE_CERT/_KEY "
            "with _CA) or a token (GATEHOUSE_TOKEN, GATEHOUSE_TOKEN_FILE or --token-file); "
            "it refuses to start without one",
        )
    elif ca and not (cert and key):
        problem(
            where,
            "watches the control plane over TLS with a token: a control plane with TLS accepts only "
            "a client certificate (role data_plane) on the config stream",
        )


def data_plane_tls(args: list[str], env: dict[str, str]) -> bool:
    return given(args, env, "GATEHOUSE_CONTROL_PLANE_CA", "--control-plane-ca")


def holds_secret(name: str) -> bool:
    """A variable that holds a token or the secrets key itself (not the name of a file)."""
    return name.startswith("GATEHOUSE_") and (name.endswith("_TOKEN") or name == "GATEHOUSE_SECRETS_KEY")


# Variables that name a file holding a token, a key or a certificate.
CREDENTIAL_FILE_VARS = {
    "GATEHOUSE_TLS_CERT", "GATEHOUSE_TLS_KEY", "GATEHOUSE_TLS_CA",
    "GATEHOUSE_CONTROL_PLANE_CA", "GATEHOUSE_CONTROL_PLANE_CERT", "GATEHOUSE_CONTROL_PLANE_KEY",
    "GATEHOUSE_CA", "GATEHOUSE_CERT", "GATEHOUSE_KEY",
}


def names_credential_file(name: str) -> bool:
    return name in CREDENTIAL_FILE_VARS or (
        name.startswith("GATEHOUSE_") and name.endswith(("_TOKEN_FILE", "_KEY_FILE"))
    )


# ---------------------------------------------------------------------------
# Kubernetes


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_secret_file(where: str, var: str, path: str, mounts: dict[str, str], secret_files: dict) -> None:
    """A credential file of a container: in a volume backed by a Secret, under a key it maps."""
    path = re.sub(r"\$\((\w+)\)", r"\1", path)
    best = max((m for m in mounts if path.startswith(m + "/")), key=len, default=None)
    if best is None:
        problem(where, f"{var}={path} is in no volume mount: mount the Secret that holds it")
        return
    vol = mounts[best]
    if vol not in secret_files:
        problem(where, f"{var}={path} is in volume {vol!r}, which is not backed by a Secret")
        return
    files = secret_files[vol]
    name = path[len(best) + 1:]
    if files is not None and "$" not in name and "POD_" not in name and name not in files:
        problem(where, f"{var}={path}: volume {vol!r} holds no {name!r} (it maps {', '.join(sorted(files))})")


def check_tls_agrees(tls_of: dict[str, list[tuple[str, bool]]]) -> None:
    """Data planes watch over TLS exactly when the control plane serves TLS."""
    cps = tls_of.get("control-plane", [])
    if not cps:
        return
    cp_tls = all(t for _, t in cps)
    for where, t in tls_of.get("data-plane", []):
        if t != cp_tls:
            problem(
                where,
                "watches the control plane over TLS, which serves plaintext" if t
                else "watches the control plane in plaintext, which serves TLS: give GATEHOUSE_CONTROL_PLANE_CA "
                "and a client certificate",
            )


def check_kubernetes(cli: Cli) -> None:
    kdir = DEPLOY / "kubernetes"
    kust_path = kdir / "kustomization.yaml"
    kust = yaml.safe_load(kust_path.read_text())
    listed = kust.get("resources", [])
    for r in listed:
        if not (kdir / r).is_file():
            problem(rel(kust_path), f"resource {r} does not exist")
    for f in sorted(kdir.glob("*.yaml")):
        if f.name != "kustomization.yaml" and f.name not in listed:
            problem(rel(kust_path), f"{f.name} is not listed in resources")

    objs: list[tuple[str, dict]] = []
    for f in sorted(kdir.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in load_docs(f):
            objs.append((f"{rel(f)} {d.get('kind')}/{d.get('metadata', {}).get('name')}", d))

    workloads = {}  # (kind, name) -> (where, template labels, {port name: number})
    secret_refs: dict[str, list[str]] = {}  # Secret name -> containers or pods using it
    tls_of: dict[str, list[tuple[str, bool]]] = {}  # subcommand -> [(where, TLS on the cluster link)]
    for where, d in objs:
        kind = d["kind"]
        ns = d["metadata"].get("namespace")
        if kind != "Namespace" and ns != "gatehouse":
            problem(where, f"namespace is {ns!r}, expected 'gatehouse'")
        if kind not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]
        tmpl = spec["template"]
        labels = tmpl["metadata"].get("labels", {})
        if not matches(spec["selector"].get("matchLabels"), labels):
            problem(where, "spec.selector does not match the pod template labels")
        pod = tmpl["spec"]
        if pod.get("hostNetwork"):
            problem(where, "hostNetwork would put the plaintext ports on the node's network")
        ports: dict[str, int] = {}
        # Secret-backed volumes: name -> {file name: Secret} (None: every key of a Secret).
        secret_files: dict[str, dict[str, str] | None] = {}
        for v in pod.get("volumes", []):
            sources = []
            if "secret" in v:
                sources = [{"secret": {"name": v["secret"].get("secretName"), "items": v["secret"].get("items")}}]
            elif "projected" in v:
                sources = v["projected"].get("sources", [])
            files: dict[str, str] | None = {}
            for src in sources:
                sec = src.get("secret")
                if not sec:
                    continue
                secret_refs.setdefault(sec.get("name"), []).append(f"{where} volume {v['name']}")
                if sec.get("items") is None:
                    files = None
                elif files is not None:
                    files.update({i["path"]: sec.get("name") for i in sec["items"]})
            if sources and any("secret" in src for src in sources):
                secret_files[v["name"]] = files
        for c in pod["containers"]:
            cwhere = f"{where} container {c['name']}"
            mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
            for p in c.get("ports", []):
                if "hostPort" in p:
                    problem(cwhere, f"hostPort {p['hostPort']} exposes a port on the node")
                if "name" in p:
                    ports[p["name"]] = p["containerPort"]
            defined: set[str] = set()
            env: dict[str, str] = {}
            for e in c.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                    if ref not in defined:
                        problem(cwhere, f"env {e['name']} uses $({ref}), which is not defined before it")
                defined.add(e["name"])
                if holds_secret(e["name"]):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if not ref:
                        problem(cwhere, f"env {e['name']} must come from a Secret (valueFrom.secretKeyRef), not a value")
                    else:
                        secret_refs.setdefault(ref.get("name"), []).append(cwhere)
                if names_credential_file(e["name"]):
                    check_secret_file(cwhere, e["name"], e.get("value", ""), mounts, secret_files)
                if "value" in e:
                    env[e["name"]] = re.sub(r"\$\((\w+)\)", r"\1", e["value"])
                else:
                    env[e["name"]] = "<from " + str(list(e.get("valueFrom", {}))) + ">"
            args = [str(a) for a in c.get("args", [])]
            if not args:
                problem(cwhere, "no args: the image's default command only prints --help")
                continue
            sub = args[0]
            cli.check(cwhere, sub, args[1:], list(env))
            check_credential(cwhere, sub, args[1:], env)
            if sub == "control-plane":
                tls_of.setdefault(sub, []).append((cwhere, has_tls(sub, args[1:], env)))
            elif sub == "data-plane":
                tls_of.setdefault(sub, []).append((cwhere, data_plane_tls(args[1:], env)))
            # POD_IP stands for a pod-network address: not loopback.
            check_insecure(cwhere, sub, args[1:], {k: v.replace("POD_IP", "10.0.0.1") for k, v in env.items()})
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                port = (pr.get("httpGet") or pr.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problem(cwhere, f"{probe} uses port {port!r}, not a named container port")
            if sub == "data-plane":
                for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    got = (c.get(probe) or {}).get("httpGet", {})
                    if got.get("path") != path or ports.get(got.get("port")) != 9090:
                        problem(cwhere, f"{probe} should be GET {path} on the ops port 9090")
        workloads[(kind, d["metadata"]["name"])] = (where, labels, ports)

    check_tls_agrees(tls_of)
    # Secrets are made by hand (README.md says how), never shipped here.
    readme = (kdir / "README.md").read_text()
    for name, users in sorted(secret_refs.items()):
        if not re.search(rf"create secret (generic|tls) {re.escape(name)}(?![\w-])", readme):
            problem(
                users[0],
                f"uses Secret {name!r}, which {rel(kdir / 'README.md')} "
                f"does not tell how to create (`kubectl create secret generic|tls {name} ...`)",
            )
    for where, d in objs:
        if d["kind"] == "Secret":
            problem(where, "a Secret in the manifests would ship its value: create Secrets by hand")

    for where, d in objs:
        kind, spec = d["kind"], d.get("spec", {})
        if kind == "Service":
            sel = spec.get("selector", {})
            hits = [w for w in workloads.values() if matches(sel, w[1])]
            if not hits:
                problem(where, f"selector {sel} matches no workload")
            for p in spec.get("ports", []):
                tp = p.get("targetPort", p["port"])
                for _, _, ports in hits:
                    if isinstance(tp, str) and tp not in ports:
                        problem(where, f"targetPort {tp!r} is not a port of the selected pods")
                    num = ports.get(tp, tp)
                    if num in (ADMIN_PORT, RAFT_PORT) and spec.get("type", "ClusterIP") != "ClusterIP":
                        problem(where, f"exposes the admin/Raft port {num} as {spec['type']}")
        elif kind == "PodDisruptionBudget":
            sel = spec["selector"].get("matchLabels", {})
            if not any(matches(sel, w[1]) for w in workloads.values()):
                problem(where, f"selector {sel} matches no workload")
        elif kind == "HorizontalPodAutoscaler":
            ref = spec["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in workloads:
                problem(where, f"scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
        elif kind == "StatefulSet":
            svc = spec.get("serviceName")
            heads = [
                o for _, o in objs
                if o["kind"] == "Service" and o["metadata"]["name"] == svc
                and o["spec"].get("clusterIP") == "None"
            ]
            if not heads:
                problem(where, f"serviceName {svc!r} is not a headless Service in deploy/kubernetes")
            if not spec.get("volumeClaimTemplates"):
                problem(where, "no volumeClaimTemplates: control-plane state would not persist")
        elif kind == "NetworkPolicy":
            for rule in spec.get("ingress", []):
                opens = {p.get("port") for p in rule.get("ports", [])}
                if opens & {ADMIN_PORT, RAFT_PORT} and not rule.get("from"):
                    problem(where, f"ports {sorted(opens & {ADMIN_PORT, RAFT_PORT})} open to every source")
                for peer in rule.get("from", []):
                    if "ipBlock" in peer and opens & {ADMIN_PORT, RAFT_PORT}:
                        problem(where, "admin/Raft ports opened to an ipBlock")


# ---------------------------------------------------------------------------
# Compose


def check_compose(cli: Cli) -> None:
    path = DEPLOY / "compose" / "compose.yaml"
    where0 = rel(path)
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services", {})
    networks = doc.get("networks", {})
    volumes = doc.get("volumes", {})
    secrets = doc.get("secrets", {}) or {}
    check_compose_secret_files(path, secrets)
    subnets = {
        n: [ipaddress.ip_network(c["subnet"]) for c in (v or {}).get("ipam", {}).get("config", [])]
        for n, v in networks.items()
    }
    seen_ips: dict[str, str] = {}
    # Which control-plane services serve TLS, for the data planes and ctl that call them.
    cp_tls: dict[str, bool] = {}
    for name, s in services.items():
        cmd = s.get("command", [])
        cmd = cmd.split() if isinstance(cmd, str) else [str(a) for a in cmd]
        env = s.get("environment", {})
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}
        if cmd[:1] == ["control-plane"]:
            cp_tls[name] = has_tls("control-plane", cmd[1:], env)
    for name, s in services.items():
        where = f"{where0} service {name}"
        deps = s.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            if dep not in services:
                problem(where, f"depends_on unknown service {dep!r}")
        nets = s.get("networks", [])
        for net, conf in (nets.items() if isinstance(nets, dict) else ((n, None) for n in nets)):
            if net not in networks:
                problem(where, f"unknown network {net!r}")
                continue
            ip = (conf or {}).get("ipv4_address")
            if ip:
                if not any(ipaddress.ip_address(ip) in sn for sn in subnets[net]):
                    problem(where, f"{ip} is outside the subnet of network {net}")
                if ip in seen_ips:
                    problem(where, f"{ip} is also given to {seen_ips[ip]}")
                seen_ips[ip] = name
        for v in s.get("volumes", []):
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if src and not src.startswith((".", "/")) and src not in volumes:
                problem(where, f"unknown volume {src!r}")
            if src.startswith("."):
                if not (path.parent / src).exists():
                    problem(where, f"bind mount source {src} does not exist")
        for p in s.get("ports", []):
            p = str(p)
            parts = p.split(":")
            if len(parts) != 3 or parts[0] != "127.0.0.1":
                problem(where, f"port {p!r}: publish on 127.0.0.1 only (HOST_IP:HOST_PORT:CONTAINER_PORT)")
            if parts[-1].split("/")[0] in (str(ADMIN_PORT), str(RAFT_PORT)):
                problem(where, f"port {p!r} publishes a plaintext admin/Raft port")
        image = s.get("image", "")
        if not image.startswith("gatehouse:"):
            continue
        cmd = s.get("command", [])
        if isinstance(cmd, str):
            cmd = cmd.split()
        env = s.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        env = {k: str(v) for k, v in env.items()}
        mounted = {}  # path in the container -> secret name
        for sec in s.get("secrets", []):
            src = sec if isinstance(sec, str) else sec.get("source", "")
            target = src if isinstance(sec, str) else sec.get("target", src)
            if src not in secrets:
                problem(where, f"uses secret {src!r}, which the top-level `secrets:` does not define")
            mounted[target if target.startswith("/") else f"/run/secrets/{target}"] = src
        for var, value in env.items():
            if holds_secret(var):
                problem(where, f"{var} puts a secret in the compose file: mount a secret and name its file with {var}_FILE")
            elif names_credential_file(var) and value not in mounted:
                problem(where, f"{var}={value}: no secret of this service is mounted there")
        if s.get("entrypoint") == ["/usr/local/bin/gatehousectl"]:
            cli.check(where, "gatehousectl", [a for a in cmd if a.startswith("--")], list(env))
            if ("GATEHOUSE_CERT" in env) != ("GATEHOUSE_KEY" in env):
                problem(where, "GATEHOUSE_CERT and GATEHOUSE_KEY go together")
            if ("GATEHOUSE_CERT" in env) and "GATEHOUSE_CA" not in env:
                problem(where, "GATEHOUSE_CERT needs GATEHOUSE_CA (the cluster CA)")
            server = env.get("GATEHOUSE_SERVER", "").rsplit(":", 1)[0]
            if server in cp_tls and cp_tls[server] != ("GATEHOUSE_CA" in env):
                problem(
                    where,
                    f"GATEHOUSE_SERVER {server} serves TLS: gatehousectl needs GATEHOUSE_CA" if cp_tls[server]
                    else f"GATEHOUSE_CA with {server}, which serves plaintext",
                )
            continue
        if not cmd:
            problem(where, "no command: the image's default command only prints --help")
            continue
        sub = cmd[0]
        cli.check(where, sub, cmd[1:], list(env))
        check_credential(where, sub, cmd[1:], env)
        check_insecure(where, sub, cmd[1:], env)
        if sub in LISTEN_VARS:
            for var in LISTEN_VARS[sub]:
                if var in env:
                    host = host_of(env[var])
                    mine = [
                        (c or {}).get("ipv4_address")
                        for c in (nets.values() if isinstance(nets, dict) else [])
                    ]
                    if not is_loopback(host) and host not in mine:
                        problem(where, f"{var}={env[var]}: {host} is not one of this service's addresses")
        if sub == "data-plane":
            for cp in env.get("GATEHOUSE_CONTROL_PLANES", "").split(","):
                svc = cp.strip().rsplit(":", 1)[0]
                if svc and svc not in services:
                    problem(where, f"GATEHOUSE_CONTROL_PLANES names {svc!r}, not a service")
                elif svc in cp_tls:
                    check_tls_agrees({"control-plane": [(svc, cp_tls[svc])], "data-plane": [(where, data_plane_tls(cmd[1:], env))]})


def gitignored(f: Path) -> bool:
    """Whether a .gitignore between deploy/ and f's directory ignores f (plain globs only)."""
    d = f.parent
    while d != DEPLOY.parent:
        gi = d / ".gitignore"
        if gi.is_file():
            relpath = str(f.relative_to(d))
            for pat in gi.read_text().splitlines():
                pat = pat.strip()
                if not pat or pat.startswith(("#", "!")):
                    continue
                if pat.endswith("/"):
                    # A directory: everything below it.
                    dirs = relpath.split("/")[:-1]
                    if any(fnmatch.fnmatch(x, pat.strip("/")) for x in dirs) or (
                        "/" in pat.strip("/") and relpath.startswith(pat.lstrip("/"))
                    ):
                        return True
                elif fnmatch.fnmatch(relpath, pat.lstrip("/")) or fnmatch.fnmatch(f.name, pat):
                    return True
        d = d.parent
    return False


def check_compose_secret_files(path: Path, secrets: dict) -> None:
    """File-based secrets hold tokens made by hand: never committed."""
    for name, conf in secrets.items():
        where = f"{rel(path)} secret {name}"
        f = (conf or {}).get("file")
        if not f:
            continue
        target = (path.parent / f).resolve()
        if not target.is_relative_to(DEPLOY):
            problem(where, f"file {f} is outside deploy/")
        elif not gitignored(target):
            problem(where, f"file {f} is not ignored by a .gitignore beside it: a token or key could be committed")


# ---------------------------------------------------------------------------
# Dockerfile


def dockerignore_patterns() -> list[tuple[bool, str]]:
    pats = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pats.append((neg, line.lstrip("!").rstrip("/")))
    return pats


def ignored(path: str, pats: list[tuple[bool, str]]) -> bool:
    out = False
    for neg, pat in pats:
        pat = pat.replace("**/", "")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            out = not neg
    return out


def check_dockerfile() -> None:
    path = DEPLOY / "docker" / "Dockerfile"
    where = rel(path)
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, rest.strip()))
    if len(stages) < 2:
        problem(where, "expected a multi-stage build (a builder and a runtime stage)")
        return
    pats = dockerignore_patterns()
    for stage in stages:
        for instr, rest in stage:
            if instr in ("COPY", "ADD") and "--from=" not in rest:
                srcs = [a for a in rest.split() if not a.startswith("--")][:-1]
                for s in srcs:
                    s = s.rstrip("/").removeprefix("./")
                    if not (ROOT / s).exists():
                        problem(where, f"{instr} {s}: not in the build context (the repository root)")
                    elif ignored(s, pats):
                        problem(where, f"{instr} {s}: excluded by .dockerignore")
            if instr == "RUN" and "cargo build" in rest and "--locked" not in rest:
                problem(where, "cargo build without --locked")
    final = stages[-1]
    users = [rest for instr, rest in final if instr == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problem(where, "the runtime stage must end with a non-root USER")
    if any(instr == "HEALTHCHECK" for instr, _ in final):
        problem(where, "no HEALTHCHECK: orchestrators probe /readyz and /healthz")
    exposed = {p.split("/")[0] for instr, rest in final if instr == "EXPOSE" for p in rest.split()}
    for port in ("8080", "9090", "9400", "9401"):
        if port not in exposed:
            problem(where, f"the runtime stage does not EXPOSE the default port {port}")
    if not any(instr == "ENTRYPOINT" for instr, _ in final):
        problem(where, "the runtime stage has no ENTRYPOINT")
    built = " ".join(rest for instr, rest in stages[0] if instr == "RUN")
    for b in ("gatehouse", "gatehousectl"):
        if f"-p {b}" not in built:
            problem(where, f"the builder does not build {b}")


# ---------------------------------------------------------------------------
# Secrets: no private keys, admin tokens (ght_...), API keys (ghk_...),
# secrets keys or passwords in anything git would commit under deploy/


# Anywhere, comments and READMEs included: committed is committed.
KEY_MATERIAL = re.compile(
    r"(-----BEGIN [A-Z ]*PRIVATE KEY-----|\bght_[A-Za-z0-9]{40}\b|\bghk_[A-Za-z0-9]{6,}_[A-Za-z0-9]{20,}"
    r"|(?<![\w:])[0-9a-fA-F]{64}(?!\w))"
)
# In YAML settings (comments aside): values that look like credentials.
YAML_SECRET = re.compile(
    r"(password\s*[:=]\s*\S+|requirepass|GATEHOUSE_[A-Z_]*TOKEN\s*[:=]|GATEHOUSE_SECRETS_KEY\s*[:=])",
    re.IGNORECASE,
)
# Files named like tokens, keys or private keys.
SECRET_NAMES = ("*.token", "*.key", "*-key.pem", "*.p12", "*.pfx")


def check_no_secrets() -> None:
    for f in sorted(DEPLOY.rglob("*")):
        if not f.is_file() or f.name == ".gitignore" or gitignored(f):
            continue
        if any(fnmatch.fnmatch(f.name, pat) for pat in SECRET_NAMES):
            problem(rel(f), "named like a token or key, and no .gitignore keeps it out of git: never commit one")
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        yaml_file = f.suffix in (".yaml", ".yml", "")
        for n, line in enumerate(text.splitlines(), 1):
            m = KEY_MATERIAL.search(line)
            if m:
                what = "a private key" if "PRIVATE KEY" in m.group(0) else "a token or key"
                problem(f"{rel(f)}:{n}", f"looks like {what}; deploy/ must not carry any")
            elif yaml_file and YAML_SECRET.search(line) and not line.lstrip().startswith("#"):
                problem(f"{rel(f)}:{n}", "looks like a secret; deploy/ must not carry any")


def main() -> int:
    cli = Cli()
    NOTES.append(f"flags and variables checked against: {cli.source}")
    for check in (check_dockerfile, lambda: check_compose(cli), lambda: check_kubernetes(cli), check_no_secrets):
        try:
            check()
        except (KeyError, TypeError, AttributeError, ValueError, yaml.YAMLError) as e:
            problem("check_deploy.py", f"could not read a file the way it expects: {type(e).__name__}: {e}")
    for n in NOTES:
        print(f"  note: {n}")
    if PROBLEMS:
        for p in PROBLEMS:
            print(f"  FAIL {p}", file=sys.stderr)
        print(f"check_deploy.py: {len(PROBLEMS)} problem(s)", file=sys.stderr)
        return 1
    print("  consistency: ok (flags, variables, addresses, references, ports, Dockerfile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
