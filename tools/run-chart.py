#!/usr/bin/env python3
"""Runs the Helm chart's pods as podman containers and probes them as the kubelet would.

Run it with the chart tools' venv, the interpreter that has PyYAML (`make
test-chart-containers` does):

    .tools/venv/bin/python tools/run-chart.py [--keep] [--set KEY=VALUE ...]

What it does (issue 18):
1. `helm template` of helm/loupe with values that point the images at the locally built
   ones (localhost/loupe-coordinator and localhost/loupe-worker, tag = the chart's
   appVersion, pullPolicy Never), the bundled Redis on a local redis image, S3 on an
   s3s-fs container this script starts (`s3` on the network, the bucket made as a
   directory before it starts; the credentials in a Secret named by s3.existingSecret,
   which the script adds as `kubectl create secret` would), and CPU workers
   (worker.gpus 0, so worker.device auto renders `cpu`).
2. For each Deployment and StatefulSet (replicas as rendered), one "pod": its init
   containers in order, then its containers, started with podman exactly as rendered:
   image and pull policy, command/args, env (value, $(VAR) expansion, valueFrom
   secretKeyRef/configMapKeyRef/fieldRef/resourceFieldRef, envFrom), volumes (emptyDir ->
   a fresh directory, or a tmpfs for medium Memory; secret/configMap -> files with their
   mode, owned root:fsGroup as the kubelet writes them; PVCs and volumeClaimTemplates ->
   a fresh directory owned by fsGroup), volumeMounts (readOnly, subPath),
   securityContext (pod and container: runAsUser/runAsGroup/fsGroup/supplementalGroups,
   runAsNonRoot checked against the image, readOnlyRootFilesystem -> --read-only,
   capabilities, allowPrivilegeEscalation false -> no-new-privileges), memory/cpu limits,
   terminationGracePeriodSeconds, the pod name as hostname, and every Service that
   selects the pod as a --network-alias on one podman bridge network made here (so
   http://RELEASE-loupe-coordinator:7600 resolves as in the cluster).
3. Probes as the kubelet runs them, from this host to the container's IP: startupProbe
   first (must pass within failureThreshold tries, periodSeconds apart, after
   initialDelaySeconds), then readinessProbe and livenessProbe together; a container is
   done once ready and liveness has passed --liveness-periods times. httpGet (200-399),
   tcpSocket, exec (`podman exec`; timeoutSeconds plus --exec-overhead seconds for
   podman itself) and grpc (grpc.health.v1.Health/Check must answer SERVING; made with
   Python grpcio, which tools/setup-k8s-tools.sh installs with the chart tools: no
   grpcurl or grpc_health_probe is at hand). One line per probe result.
4. Every container must stay up the whole time (a usage error, a bad flag or a crash
   ends the run with its logs), and every LOUPE_* variable a loupe container is given
   must appear in its binary's --help (clap's [env: ...]) or be read in the sources.
5. Stops the containers with their grace period (SIGTERM, as the kubelet does, and
   reports how long each took), then removes them, the network and the scratch
   directory, whatever happened.

--tls renders tls.enabled with a Secret holding a test CA and a certificate for the
coordinator's Service name (the coordinator's probes are then httpGet on the metrics
port, and the workers dial https://). --set/--set-json/-f pass more values to helm.

Not emulated: NetworkPolicies (not enforced; every container reaches every other),
PodDisruptionBudgets, the ServiceAccount (automountServiceAccountToken is false in the
chart), emptyDir sizeLimit on disk (not enforced), Service endpoints following readiness
(an alias resolves as soon as the container runs), CPU requests, restarts (a container
that exits fails the run instead of being restarted).

Exits non-zero naming the pod, container and probe that failed, or the container that
exited. Needs root (rootful podman: the host reaches the containers' IPs), iptables
(netavark sets up the bridge with it) and CONTAINERS_CONF=tools/images/containers.conf
(set here if unset). The images: `make images` and tools/images/test-services.sh (Redis
and s3s-fs); `make test-chart-containers` builds those that are missing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "loupe")
HELM = os.path.join(ROOT, ".tools", "bin", "helm")

# The test services' images (tools/images/test-services.sh builds them).
REDIS_IMAGE = "localhost/loupe-test/redis:trixie"
S3_IMAGE = "localhost/loupe-test/s3s-fs:0.14.1"
S3_ACCESS_KEY = "loupe-test-access"
S3_SECRET_KEY = "loupe-test-secret-0123456789"
S3_BUCKET = "loupe-test"

T0 = time.monotonic()
PRINT_LOCK = threading.Lock()


def log(msg: str) -> None:
    with PRINT_LOCK:
        print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class Failure(Exception):
    """The chart does not run: the message names the pod, container and what failed."""


def run(cmd: list[str], check: bool = True, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise Failure(f"{' '.join(cmd[:6])}... exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def podman(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    return run(["podman", *args], check=check, timeout=timeout)


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


# ---------------------------------------------------------------------------------------
# Quantities and small Kubernetes semantics


def quantity(q) -> float:
    """A Kubernetes quantity (1Gi, 500m, 2) as a number."""
    s = str(q).strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables replaced, $$ escapes, rest kept."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2:]:
            end = text.index(")", i + 2)
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def rand_suffix(n: int) -> str:
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


# ---------------------------------------------------------------------------------------
# The render


class Render:
    def __init__(self, docs: list[dict], namespace: str):
        self.namespace = namespace
        self.docs = [d for d in docs if d]
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.configmaps: dict[str, dict[str, bytes]] = {}
        self.services: list[dict] = []
        self.workloads: list[dict] = []
        self.other: list[str] = []
        for d in self.docs:
            kind, name = d.get("kind"), d.get("metadata", {}).get("name")
            if kind == "Secret":
                data = {k: base64.b64decode(v) for k, v in (d.get("data") or {}).items()}
                data.update({k: str(v).encode() for k, v in (d.get("stringData") or {}).items()})
                self.secrets[name] = data
            elif kind == "ConfigMap":
                data = {k: str(v).encode() for k, v in (d.get("data") or {}).items()}
                data.update({k: base64.b64decode(v) for k, v in (d.get("binaryData") or {}).items()})
                self.configmaps[name] = data
            elif kind == "Service":
                self.services.append(d)
            elif kind in ("Deployment", "StatefulSet"):
                self.workloads.append(d)
            elif kind in ("DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"):
                raise Failure(f"{kind} {name}: this script runs Deployments and StatefulSets only")
            else:
                self.other.append(f"{kind}/{name}")
        # StatefulSets (the bundled Redis) first, then Deployments, each in render order.
        self.workloads.sort(key=lambda w: 0 if w["kind"] == "StatefulSet" else 1)


# ---------------------------------------------------------------------------------------
# Probes


def grpc_health_check(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    """grpc.health.v1.Health/Check, as the kubelet's gRPC probe makes it. grpcio comes with
    the chart tools (tools/setup-k8s-tools.sh); the request and the answer are one-field
    messages, written and read by hand rather than with generated code."""
    import grpc

    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if name else b""
    statuses = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
    channel = grpc.insecure_channel(f"{host}:{port}", options=[("grpc.primary_user_agent", "kube-probe/1.31")])
    try:
        answer = channel.unary_unary("/grpc.health.v1.Health/Check")(request, timeout=timeout)
        status = answer[1] if len(answer) >= 2 and answer[0] == 0x08 else 0
        return status == 1, statuses.get(status, str(status))
    except grpc.RpcError as e:
        return False, f"{e.code().name}: {e.details()}"
    finally:
        channel.close()


class Container:
    def __init__(self, pod: "Pod", spec: dict, init: bool):
        self.pod = pod
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        # Prefixed with the run's id: two runs, or a leftover, never clash.
        self.cname = f"{pod.prefix}-{pod.name}-{'init-' if init else ''}{self.name}"
        self.ip: str | None = None
        self.started_at = 0.0
        self.done = threading.Event()
        self.ready = False

    @property
    def label(self) -> str:
        return f"pod {self.pod.name} container {self.name}"

    def port(self, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise Failure(f"{self.label}: a probe names port '{port}', which the container does not declare")


class Pod:
    def __init__(self, workload: dict, index: int, render: Render, prefix: str):
        self.workload = workload
        self.prefix = prefix
        meta = workload["metadata"]
        tmpl = workload["spec"]["template"]
        self.spec = tmpl["spec"]
        self.labels = tmpl.get("metadata", {}).get("labels") or {}
        self.annotations = tmpl.get("metadata", {}).get("annotations") or {}
        if workload["kind"] == "StatefulSet":
            self.name = f"{meta['name']}-{index}"
        else:
            h = hashlib.sha256(json.dumps(tmpl, sort_keys=True).encode()).hexdigest()[:10]
            self.name = f"{meta['name']}-{h}-{rand_suffix(5)}"
        self.uid = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
        self.namespace = render.namespace
        self.render = render
        self.init_containers = [Container(self, c, True) for c in self.spec.get("initContainers") or []]
        self.containers = [Container(self, c, False) for c in self.spec["containers"]]


class Runner:
    def __init__(self, args):
        self.args = args
        self.prefix = f"lc{os.getpid()}"
        self.network = f"{self.prefix}-net"
        self.work = tempfile.mkdtemp(prefix="run-chart-")
        self.started: list[str] = []  # podman container names, in start order
        self.network_made = False
        self.pods: list[Pod] = []
        self.failure: str | None = None
        self.fail_lock = threading.Lock()
        self.stop = threading.Event()
        self.help_cache: dict[str, str] = {}

    # -- failure handling ---------------------------------------------------------------

    def fail(self, msg: str, container: Container | None = None) -> None:
        with self.fail_lock:
            if self.failure is None:
                self.failure = msg
                log(f"FAIL {msg}")
                if container is not None:
                    self.print_logs(container.cname)
        self.stop.set()

    def print_logs(self, cname: str, lines: int = 80) -> None:
        p = podman("logs", "--tail", str(lines), cname, check=False)
        text = (p.stdout + p.stderr).rstrip()
        with PRINT_LOCK:
            print(f"----- logs of {cname} (last {lines} lines) -----")
            print(text or "(no output)")
            print(f"----- end of logs of {cname} -----", flush=True)

    # -- set-up -------------------------------------------------------------------------

    def require_image(self, image: str) -> str:
        if not image_exists(image):
            raise Failure(f"no image {image} (make images; tools/images/test-services.sh)")
        return image

    def render(self) -> Render:
        if not os.path.exists(HELM):
            log("installing helm (tools/setup-k8s-tools.sh)")
            run([os.path.join(ROOT, "tools", "setup-k8s-tools.sh")], timeout=900)
        chart = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
        self.app_version = str(chart["appVersion"])
        self.redis_image = self.require_image(self.args.redis_image)
        self.s3_image = self.require_image(self.args.s3_image)
        self.s3_secret = f"{self.args.release}-test-s3"
        repo, _, tag = self.redis_image.rpartition(":")
        values = {
            "coordinator": {"image": {"repository": "localhost/loupe-coordinator", "tag": self.app_version,
                                      "pullPolicy": "Never"}},
            "worker": {"image": {"repository": "localhost/loupe-worker", "tag": self.app_version,
                                 "pullPolicy": "Never"},
                       "gpus": 0, "device": "auto"},
            "redis": {"mode": "bundled", "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"}},
            "s3": {"bucket": S3_BUCKET, "endpoint": "http://s3:9000", "forcePathStyle": True,
                   "region": "us-east-1", "existingSecret": self.s3_secret},
        }
        self.tls_secret = f"{self.args.release}-test-tls"
        if self.args.tls:
            values["tls"] = {"enabled": True, "existingSecret": self.tls_secret}
        vpath = os.path.join(self.work, "values.yaml")
        with open(vpath, "w") as f:
            yaml.safe_dump(values, f)
        cmd = [HELM, "template", self.args.release, CHART, "--namespace", self.args.namespace, "-f", vpath]
        for f in self.args.values or []:
            cmd += ["-f", os.path.abspath(f)]
        for s in self.args.set or []:
            cmd += ["--set", s]
        for s in self.args.set_json or []:
            cmd += ["--set-json", s]
        log("rendering: helm template " + " ".join(cmd[2:]).replace(ROOT + "/", "").replace(self.work, "$WORK"))
        p = run(cmd, check=False)
        if p.returncode != 0:
            raise Failure(f"helm template failed:\n{p.stderr}")
        with open(os.path.join(self.work, "render.yaml"), "w") as f:
            f.write(p.stdout)
        r = Render(list(yaml.safe_load_all(p.stdout)), self.args.namespace)
        # The S3 credentials Secret the operator would create (kubectl create secret generic
        # RELEASE-test-s3 --from-literal=AWS_ACCESS_KEY_ID=... ...), under the chart's keys.
        r.secrets[self.s3_secret] = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY.encode(),
                                     "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY.encode()}
        if self.args.tls:
            r.secrets[self.tls_secret] = self.make_tls(r)
        log(f"render: {len(r.workloads)} workloads ({', '.join(w['kind'] + '/' + w['metadata']['name'] for w in r.workloads)}), "
            f"{len(r.services)} Services, Secrets {sorted(r.secrets)}; not run here: {', '.join(r.other) or 'nothing'}")
        return r

    def make_tls(self, r: Render) -> dict[str, bytes]:
        """A kubernetes.io/tls Secret as cert-manager writes it: a CA, and a certificate
        for the coordinator's Service name (what the workers dial) signed by it."""
        names = [svc["metadata"]["name"] for svc in r.services if svc["metadata"]["name"].endswith("-coordinator")]
        if not names:
            raise Failure("--tls: no coordinator Service in the render")
        d = os.path.join(self.work, "tls")
        os.makedirs(d)
        ossl = lambda *a: run(["openssl", *a], cwd=d)
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=loupe-test-ca")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={names[0]}")
        with open(os.path.join(d, "ext.cnf"), "w") as f:
            f.write(f"subjectAltName=DNS:{names[0]},DNS:{names[0]}.{r.namespace}.svc\n")
        ossl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf")
        log(f"tls: Secret {self.tls_secret} with a test CA and a certificate for {names[0]}")
        return {k: open(os.path.join(d, k), "rb").read() for k in ("tls.crt", "tls.key", "ca.crt")}

    def make_network(self) -> None:
        podman("network", "create", self.network)
        self.network_made = True
        log(f"network {self.network} created")

    def container_ip(self, cname: str) -> str:
        p = podman("inspect", cname, "--format", "{{json .NetworkSettings.Networks}}")
        nets = json.loads(p.stdout)
        ip = (nets.get(self.network) or {}).get("IPAddress")
        if not ip:
            raise Failure(f"{cname} has no address on {self.network}")
        return ip

    def wait_tcp(self, host: str, port: int, deadline: float, what: str) -> None:
        while True:
            try:
                socket.create_connection((host, port), timeout=2).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise Failure(f"{what}: nothing listens on {host}:{port} ({e})")
                time.sleep(0.5)

    def start_s3(self) -> None:
        data = os.path.join(self.work, "s3-data")
        os.makedirs(os.path.join(data, S3_BUCKET))
        os.chmod(data, 0o777)
        os.chmod(os.path.join(data, S3_BUCKET), 0o777)
        cname = f"{self.prefix}-s3"
        podman("run", "-d", "--name", cname, "--network", self.network, "--network-alias", "s3",
               "--pull", "never", "-v", f"{data}:/data", self.s3_image,
               "--host", "0.0.0.0", "--port", "9000", "--access-key", S3_ACCESS_KEY,
               "--secret-key", S3_SECRET_KEY, "/data")
        self.started.append(cname)
        ip = self.container_ip(cname)
        self.wait_tcp(ip, 9000, time.monotonic() + 120, "the s3s-fs container")
        log(f"s3: {self.s3_image} as 's3' ({ip}:9000), bucket {S3_BUCKET} made as /data/{S3_BUCKET}")

    # -- one container --------------------------------------------------------------------

    def env_of(self, c: Container) -> tuple[list[str], dict[str, str]]:
        pod, r = c.pod, c.pod.render
        env: dict[str, str] = {}
        order: list[str] = []

        def put(k, v):
            if k not in env:
                order.append(k)
            env[k] = v

        def from_source(kind: str, ref: dict, what: str) -> bytes | None:
            store = r.secrets if kind == "secret" else r.configmaps
            name, key = ref.get("name"), ref.get("key")
            if name not in store:
                if ref.get("optional"):
                    return None
                raise Failure(f"{c.label}: {what} names {kind} '{name}', which neither the render nor this script makes")
            if key not in store[name]:
                if ref.get("optional"):
                    return None
                raise Failure(f"{c.label}: {what} names key '{key}' of {kind} '{name}', which it lacks (keys: {sorted(store[name])})")
            return store[name][key]

        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, field in (("secret", "secretRef"), ("configmap", "configMapRef")):
                if field in src:
                    store = r.secrets if kind == "secret" else r.configmaps
                    ref = src[field]
                    if ref["name"] not in store:
                        if ref.get("optional"):
                            continue
                        raise Failure(f"{c.label}: envFrom names {kind} '{ref['name']}', which does not exist")
                    for k, v in store[ref["name"]].items():
                        put(prefix + k, v.decode())
        for e in c.spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                put(name, expand(str(e.get("value", "")), env))
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                v = from_source("secret", vf["secretKeyRef"], f"env {name}")
            elif "configMapKeyRef" in vf:
                v = from_source("configmap", vf["configMapKeyRef"], f"env {name}")
            elif "fieldRef" in vf:
                path = vf["fieldRef"]["fieldPath"]
                fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace,
                          "metadata.uid": pod.uid, "spec.nodeName": socket.gethostname(),
                          "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
                          "status.hostIP": "127.0.0.1"}
                m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                if m:
                    v = (pod.labels if m.group(1) == "labels" else pod.annotations).get(m.group(2), "")
                elif path in fields:
                    v = fields[path]
                else:
                    raise Failure(f"{c.label}: env {name}: fieldRef {path} is not supported by this script")
                v = v.encode()
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                kind, _, res = ref["resource"].partition(".")
                q = ((c.spec.get("resources") or {}).get(kind) or {}).get(res)
                if q is None:
                    raise Failure(f"{c.label}: env {name}: no {ref['resource']} set (the kubelet would use the node's)")
                v = str(int(-(-quantity(q) // quantity(ref.get("divisor", "1"))))).encode()
            else:
                raise Failure(f"{c.label}: env {name}: unsupported valueFrom {sorted(vf)}")
            if v is not None:
                put(name, v.decode())
        return order, env

    def volume_dirs(self, pod: Pod) -> dict[str, dict]:
        """Each pod volume as {kind, path | tmpfs options}, made on the host."""
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        vols: dict[str, dict] = {}
        base = os.path.join(self.work, "pods", pod.name)
        claims = {t["metadata"]["name"]: t for t in pod.workload["spec"].get("volumeClaimTemplates") or []}

        def owned_dir(path: str, mode: int) -> None:
            os.makedirs(path, exist_ok=True)
            if fs_group is not None:
                os.chown(path, 0, int(fs_group))
                mode |= 0o2070  # the kubelet's SetVolumeOwnership: group rwx and setgid
            os.chmod(path, mode)

        def files(path: str, store: dict, src: dict, kind: str, vname: str) -> None:
            name = src.get("secretName") or src.get("name")
            if name not in store:
                if src.get("optional"):
                    owned_dir(path, 0o755)
                    return
                raise Failure(f"pod {pod.name}: volume {vname} names {kind} '{name}', which does not exist "
                              "(the pod would stay in ContainerCreating)")
            data = store[name]
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            default_mode = src.get("defaultMode", 0o644)
            owned_dir(path, 0o755)
            os.chmod(path, 0o1777 if fs_group is None else 0o3777)
            for it in items:
                if it["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise Failure(f"pod {pod.name}: volume {vname}: {kind} '{name}' has no key '{it['key']}'")
                fp = os.path.join(path, it["path"])
                os.makedirs(os.path.dirname(fp), exist_ok=True)
                with open(fp, "wb") as f:
                    f.write(data[it["key"]])
                mode = it.get("mode", default_mode)
                if fs_group is not None:
                    os.chown(fp, 0, int(fs_group))
                    mode |= 0o040  # the kubelet adds group read for fsGroup
                os.chmod(fp, mode)

        for v in pod.spec.get("volumes") or []:
            vname = v["name"]
            path = os.path.join(base, "volumes", vname)
            if "emptyDir" in v:
                ed = v["emptyDir"] or {}
                if ed.get("medium") == "Memory":
                    size = int(quantity(ed["sizeLimit"])) if ed.get("sizeLimit") else None
                    vols[vname] = {"kind": "tmpfs", "size": size}
                else:
                    owned_dir(path, 0o777)
                    vols[vname] = {"kind": "dir", "path": path, "ro": False}
            elif "secret" in v:
                files(path, self.render_obj.secrets, v["secret"], "Secret", vname)
                vols[vname] = {"kind": "dir", "path": path, "ro": True}
            elif "configMap" in v:
                files(path, self.render_obj.configmaps, v["configMap"], "ConfigMap", vname)
                vols[vname] = {"kind": "dir", "path": path, "ro": True}
            elif "persistentVolumeClaim" in v:
                owned_dir(path, 0o755)
                vols[vname] = {"kind": "dir", "path": path, "ro": bool(v["persistentVolumeClaim"].get("readOnly"))}
            else:
                raise Failure(f"pod {pod.name}: volume {vname}: type {sorted(set(v) - {'name'})} is not supported here")
        for cname in claims:
            if cname in vols:
                raise Failure(f"pod {pod.name}: volumeClaimTemplate {cname} clashes with a pod volume")
            path = os.path.join(base, "volumes", cname)
            owned_dir(path, 0o755)
            vols[cname] = {"kind": "dir", "path": path, "ro": False}
        return vols

    def security(self, c: Container, image: str) -> list[str]:
        pod_sc = c.pod.spec.get("securityContext") or {}
        sc = c.spec.get("securityContext") or {}
        opts: list[str] = []
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root:
            if user is None:
                img_user = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
                uid = img_user.split(":")[0]
                if not uid.isdigit():
                    raise Failure(f"{c.label}: runAsNonRoot and image {image} has non-numeric user '{img_user}': "
                                  "the kubelet refuses to start it (CreateContainerConfigError)")
                if int(uid) == 0:
                    raise Failure(f"{c.label}: runAsNonRoot and image {image} runs as root: the kubelet refuses it")
            elif int(user) == 0:
                raise Failure(f"{c.label}: runAsNonRoot with runAsUser 0")
        if user is not None:
            opts += ["--user", f"{user}:{group}" if group is not None else str(user)]
        elif group is not None:
            raise Failure(f"{c.label}: runAsGroup without runAsUser is not supported here")
        groups = list(pod_sc.get("supplementalGroups") or [])
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])
        for g in groups:
            opts += ["--group-add", str(g)]
        if sc.get("privileged"):
            opts.append("--privileged")
        if sc.get("readOnlyRootFilesystem"):
            opts += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            opts += ["--cap-drop", cap if cap == "ALL" else cap.upper()]
        for cap in caps.get("add") or []:
            opts += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            opts += ["--security-opt", "no-new-privileges"]
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            opts += ["--security-opt", "seccomp=unconfined"]
        elif seccomp not in (None, "RuntimeDefault"):
            raise Failure(f"{c.label}: seccompProfile {seccomp} is not supported here")
        return opts

    def podman_run_args(self, c: Container, vols: dict, aliases: list[str], net_of: str | None) -> list[str]:
        spec, pod = c.spec, c.pod
        image = spec["image"]
        policy = spec.get("imagePullPolicy") or ("Always" if image.endswith(":latest") or ":" not in image else "IfNotPresent")
        if not image_exists(image):
            raise Failure(f"{c.label}: image {image} is not here (imagePullPolicy {policy}; "
                          "this machine reaches no registry: build it first)")
        a = ["run", "-d", "--name", c.cname, "--pull", {"Never": "never", "IfNotPresent": "missing", "Always": "always"}[policy]]
        if net_of:
            a += ["--network", f"container:{net_of}"]
        else:
            a += ["--network", self.network, "--hostname", pod.name[:63]]
            for al in aliases:
                a += ["--network-alias", al]
        order, env = self.env_of(c)
        for k in order:
            a += ["--env", f"{k}={env[k]}"]
        a += self.security(c, image)
        limits = (spec.get("resources") or {}).get("limits") or {}
        for res, q in limits.items():
            if res == "memory":
                a += ["--memory", str(int(quantity(q)))]
            elif res == "cpu":
                a += ["--cpus", f"{quantity(q):g}"]
            else:
                raise Failure(f"{c.label}: limits ask for {res}: {q}, which this machine does not have")
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        a += ["--stop-timeout", str(grace)]
        if spec.get("workingDir"):
            a += ["--workdir", spec["workingDir"]]
        if spec.get("stdin"):
            a.append("-i")
        if spec.get("tty"):
            a.append("-t")
        for m in spec.get("volumeMounts") or []:
            vname = m["name"]
            if vname not in vols:
                raise Failure(f"{c.label}: volumeMount {vname} names no pod volume")
            v = vols[vname]
            dest = m["mountPath"]
            sub = m.get("subPath") or (expand(m["subPathExpr"], env) if m.get("subPathExpr") else "")
            if v["kind"] == "tmpfs":
                if sub:
                    raise Failure(f"{c.label}: subPath on a memory emptyDir is not supported here")
                opt = f"type=tmpfs,destination={dest},tmpfs-mode=1777"
                if v["size"]:
                    opt += f",tmpfs-size={v['size']}"
                a += ["--mount", opt]
                continue
            src = v["path"]
            if sub:
                src = os.path.join(src, sub)
                if not os.path.exists(src):
                    os.makedirs(src)  # the kubelet makes a missing subPath as a directory
            ro = m.get("readOnly") or v["ro"]
            a += ["--mount", f"type=bind,source={src},destination={dest}" + (",ro=true" if ro else "")]
        if spec.get("command"):
            a += ["--entrypoint", json.dumps([expand(x, env) for x in spec["command"]])]
        a.append(image)
        a += [expand(str(x), env) for x in spec.get("args") or []]
        return a

    def start_pod(self, pod: Pod) -> None:
        r = self.render_obj
        aliases = []
        for svc in r.services:
            sel = svc["spec"].get("selector") or {}
            if selects(sel, pod.labels):
                n = svc["metadata"]["name"]
                aliases += [n, f"{n}.{pod.namespace}", f"{n}.{pod.namespace}.svc", f"{n}.{pod.namespace}.svc.cluster.local"]
                for p in svc["spec"].get("ports") or []:
                    target = p.get("targetPort", p["port"])
                    cport = None
                    for c in pod.containers:
                        try:
                            cport = c.port(target)
                            break
                        except Failure:
                            pass
                    if cport is None:
                        raise Failure(f"Service {n} port {p.get('name', p['port'])}: targetPort {target} is no port of pod {pod.name}")
                    if cport != int(p["port"]):
                        raise Failure(f"Service {n} port {p['port']} -> {cport}: a network alias cannot remap ports")
                if svc["spec"].get("clusterIP") == "None" and pod.workload["kind"] == "StatefulSet" \
                        and pod.workload["spec"].get("serviceName") == n:
                    aliases += [f"{pod.name}.{n}", f"{pod.name}.{n}.{pod.namespace}.svc.cluster.local"]
        if pod.spec.get("automountServiceAccountToken", True):
            log(f"note: pod {pod.name} would get a service account token mounted; none is here")
        if pod.spec.get("hostNetwork") or pod.spec.get("hostPID"):
            raise Failure(f"pod {pod.name}: hostNetwork/hostPID is not supported here")
        vols = self.volume_dirs(pod)
        svc_names = sorted({a for a in aliases if "." not in a})
        log(f"pod {pod.name} ({pod.workload['kind']} {pod.workload['metadata']['name']}): Services {svc_names or 'none'}")
        for c in pod.init_containers:
            a = self.podman_run_args(c, vols, aliases, None)
            podman(*a)
            self.started.append(c.cname)
            p = podman("wait", c.cname, check=False, timeout=self.args.startup_cap)
            code = p.stdout.strip()
            log(f"pod {pod.name} init container {c.name}: exited {code}")
            if code != "0":
                self.fail(f"pod {pod.name} init container {c.name} exited {code}", c)
                raise Failure(self.failure)
        first = None
        for c in pod.containers:
            a = self.podman_run_args(c, vols, aliases, first)
            p = podman(*a, check=False)
            if p.returncode != 0:
                raise Failure(f"{c.label}: podman run failed: {p.stderr.strip()}\n  podman {' '.join(a)}")
            self.started.append(c.cname)
            c.started_at = time.monotonic()
            c.ip = self.container_ip(first or c.cname)
            first = first or c.cname
            log(f"{c.label}: started {c.spec['image']} as {c.cname} at {c.ip}"
                + (f", args {c.spec.get('args')}" if c.spec.get("args") else "")
                + (f", command {c.spec.get('command')}" if c.spec.get("command") else ""))
        self.pods.append(pod)

    # -- probes ---------------------------------------------------------------------------

    def probe_once(self, c: Container, probe: dict) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        t = time.monotonic()
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                port = c.port(h["port"])
                host = h.get("host") or c.ip
                scheme = h.get("scheme", "HTTP")
                cls = http.client.HTTPSConnection if scheme == "HTTPS" else http.client.HTTPConnection
                kw = {}
                if scheme == "HTTPS":
                    import ssl
                    kw["context"] = ssl._create_unverified_context()  # the kubelet does not verify
                conn = cls(host, port, timeout=timeout, **kw)
                headers = {"User-Agent": "kube-probe/1.31", "Accept": "*/*"}
                for hh in h.get("httpHeaders") or []:
                    headers[hh["name"]] = hh["value"]
                try:
                    conn.request("GET", h.get("path", "/"), headers=headers)
                    resp = conn.getresponse()
                    body = resp.read(200).decode(errors="replace").strip().replace("\n", " ")
                finally:
                    conn.close()
                ok = 200 <= resp.status < 400
                what = f"GET {scheme.lower()}://{host}:{port}{h.get('path', '/')} -> {resp.status} {body[:80]!r}"
            elif "tcpSocket" in probe:
                port = c.port(probe["tcpSocket"]["port"])
                socket.create_connection((probe["tcpSocket"].get("host") or c.ip, port), timeout=timeout).close()
                ok, what = True, f"tcp {c.ip}:{port} connected"
            elif "exec" in probe:
                cmd = probe["exec"]["command"]
                try:
                    p = run(["podman", "exec", c.cname, *cmd], check=False,
                            timeout=timeout + self.args.exec_overhead)
                    ok = p.returncode == 0
                    out = (p.stdout + p.stderr).strip().replace("\n", " ")
                    what = f"exec {cmd} -> exit {p.returncode} {out[:80]!r}"
                except subprocess.TimeoutExpired:
                    ok, what = False, f"exec {cmd} timed out ({timeout:g}s + {self.args.exec_overhead:g}s for podman)"
            elif "grpc" in probe:
                g = probe["grpc"]
                port = c.port(g["port"])
                service = g.get("service", "")
                ok, detail = grpc_health_check(c.ip, port, service, timeout)
                what = f"grpc {c.ip}:{port} Health/Check service={service!r} -> {detail}"
            else:
                raise Failure(f"{c.label}: a probe with no handler: {probe}")
        except Failure:
            raise
        except Exception as e:  # connection refused, timeouts: a failed probe
            ok, what = False, f"{type(e).__name__}: {e}"
        return ok, f"{what} ({(time.monotonic() - t) * 1000:.0f} ms)"

    def watch_container(self, c: Container) -> None:
        try:
            self._watch(c)
        except Failure as e:
            self.fail(str(e), c)
        except Exception as e:
            self.fail(f"{c.label}: the prober crashed: {type(e).__name__}: {e}", c)

    def _sleep_until(self, t: float) -> bool:
        """False if the run is stopping."""
        return not self.stop.wait(max(0.0, t - time.monotonic()))

    def _watch(self, c: Container) -> None:
        spec = c.spec
        startup, ready_p, live_p = spec.get("startupProbe"), spec.get("readinessProbe"), spec.get("livenessProbe")

        def line(kind, n, ok, detail):
            log(f"{c.label} {kind} #{n}: {'ok  ' if ok else 'FAIL'} {detail}")

        if startup:
            delay, period = startup.get("initialDelaySeconds", 0), startup.get("periodSeconds", 10)
            thr = startup.get("failureThreshold", 3)
            nxt = c.started_at + delay
            fails = 0
            n = 0
            while True:
                if not self._sleep_until(nxt):
                    return
                nxt = time.monotonic() + period
                n += 1
                ok, detail = self.probe_once(c, startup)
                line("startupProbe", n, ok, detail)
                if ok:
                    break
                fails += 1
                if fails >= thr:
                    raise Failure(f"{c.label}: startupProbe failed {fails} times (failureThreshold {thr} x "
                                  f"periodSeconds {period}s): the kubelet would kill and restart it; last: {detail}")
            log(f"{c.label}: started after {time.monotonic() - c.started_at:.1f}s")
        start = time.monotonic()
        ready_deadline = start + self.args.ready_timeout
        probes = []
        for kind, p in (("readinessProbe", ready_p), ("livenessProbe", live_p)):
            if p:
                # initialDelaySeconds counts from the container's start.
                probes.append({"kind": kind, "p": p, "next": max(start, c.started_at + p.get("initialDelaySeconds", 0)),
                               "fails": 0, "oks": 0, "n": 0})
        if not ready_p:
            c.ready = True
        live_oks_needed = self.args.liveness_periods if live_p else 0
        while True:
            if c.ready and all(pr["oks"] >= live_oks_needed for pr in probes if pr["kind"] == "livenessProbe"):
                if not c.done.is_set():
                    log(f"{c.label}: ready, and live for {live_oks_needed} liveness periods")
                    c.done.set()
            if not probes:
                return
            pr = min(probes, key=lambda x: x["next"])
            if not c.ready and time.monotonic() > ready_deadline:
                raise Failure(f"{c.label}: readinessProbe never passed within {self.args.ready_timeout:g}s of start-up")
            if not self._sleep_until(min(pr["next"], ready_deadline if not c.ready else pr["next"])):
                return
            if time.monotonic() < pr["next"]:
                continue
            p = pr["p"]
            pr["next"] = time.monotonic() + p.get("periodSeconds", 10)
            pr["n"] += 1
            ok, detail = self.probe_once(c, p)
            line(pr["kind"], pr["n"], ok, detail)
            thr = p.get("failureThreshold", 3)
            if ok:
                pr["fails"] = 0
                pr["oks"] += 1
                if pr["kind"] == "readinessProbe" and pr["oks"] >= p.get("successThreshold", 1) and not c.ready:
                    c.ready = True
                    log(f"{c.label}: ready {time.monotonic() - c.started_at:.1f}s after start")
            else:
                pr["fails"] += 1
                pr["oks"] = 0 if pr["kind"] == "readinessProbe" else pr["oks"]
                if pr["kind"] == "livenessProbe" and pr["fails"] >= thr:
                    raise Failure(f"{c.label}: livenessProbe failed {thr} times in a row: the kubelet would restart it; last: {detail}")
                if pr["kind"] == "readinessProbe" and c.ready and pr["fails"] >= thr:
                    raise Failure(f"{c.label}: readinessProbe failed {thr} times in a row after it was ready; last: {detail}")

    def watch_exits(self, containers: list[Container]) -> None:
        while not self.stop.is_set():
            for c in containers + [None]:
                name = c.cname if c else f"{self.prefix}-s3"
                st = podman("inspect", name, "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                            check=False).stdout.split()
                if not st or st[0] != "running":
                    what = c.label if c else "the s3s-fs container"
                    detail = f"state {st[0]}, exit code {st[1]}{', OOM-killed' if st[2] == 'true' else ''}" if st else "gone"
                    if c is None:
                        self.fail(f"{what} is not running ({detail})")
                        self.print_logs(name)
                    else:
                        self.fail(f"{what} exited ({detail}): it must stay up (a bad flag, env or mount ends it)", c)
                    return
            self.stop.wait(2)

    # -- env names the binaries read -------------------------------------------------------

    def check_env_names(self) -> None:
        src_dirs = [os.path.join(ROOT, d) for d in ("coordinator/src", "worker/src", "core/src", "cli/src", "metrics/src")]
        for pod in self.pods:
            for c in pod.containers:
                image = c.spec["image"]
                if not any(e["name"].startswith("LOUPE_") for e in c.spec.get("env") or []):
                    continue  # not a loupe binary (the bundled Redis)
                if image not in self.help_cache:
                    p = podman("run", "--rm", "--network", "none", "--pull", "never", image, "--help", check=False, timeout=300)
                    self.help_cache[image] = p.stdout + p.stderr
                    if p.returncode != 0:
                        raise Failure(f"{c.label}: `podman run --rm {image} --help` exited {p.returncode}:\n{self.help_cache[image]}")
                text = self.help_cache[image]
                for e in c.spec.get("env") or []:
                    n = e["name"]
                    if not n.startswith("LOUPE_"):
                        continue
                    if f"env: {n}=" in text:
                        continue
                    found = subprocess.run(["grep", "-rqF", f'"{n}"', *[d for d in src_dirs if os.path.isdir(d)]]).returncode == 0
                    if not found:
                        raise Failure(f"{c.label}: the chart sets {n}, which {image} --help does not list and no source reads")
                    log(f"note: {c.label}: {n} is read outside clap (not in --help; found in the sources)")
        log("env: every LOUPE_* variable the loupe containers get is a clap env of their binary or read in its sources")

    # -- the whole run --------------------------------------------------------------------

    def main(self) -> int:
        if not shutil.which("iptables"):
            raise Failure("iptables is missing: netavark needs it for the bridge network (apt-get install iptables)")
        self.render_obj = self.render()
        self.make_network()
        self.start_s3()
        for w in self.render_obj.workloads:
            for i in range(int(w["spec"].get("replicas", 1))):
                self.start_pod(Pod(w, i, self.render_obj, self.prefix))
        containers = [c for pod in self.pods for c in pod.containers]
        threads = [threading.Thread(target=self.watch_container, args=(c,), daemon=True) for c in containers]
        for t in threads:
            t.start()
        exits = threading.Thread(target=self.watch_exits, args=(containers,), daemon=True)
        exits.start()
        try:
            self.check_env_names()
        except Failure as e:
            self.fail(str(e))
        deadline = time.monotonic() + self.args.timeout
        while not self.stop.is_set():
            if all(c.done.is_set() for c in containers):
                break
            if time.monotonic() > deadline:
                waiting = [c.label for c in containers if not c.done.is_set()]
                self.fail(f"not all containers ready and live within --timeout {self.args.timeout:g}s: {waiting}")
                break
            self.stop.wait(1)
        self.stop.set()
        exits.join(timeout=60)
        for t in threads:
            t.join(timeout=60)
        if self.failure is None:
            self.watch_once(containers)  # a last look: every container still up
        if self.failure:
            return 1
        log(f"all {len(containers)} containers of {len(self.pods)} pods started, ready and live")
        if not self.args.keep:
            self.graceful_stop(containers)
        return 1 if self.failure else 0

    def watch_once(self, containers: list[Container]) -> None:
        for c in containers:
            st = podman("inspect", c.cname, "--format", "{{.State.Status}} {{.State.ExitCode}}", check=False).stdout.split()
            if not st or st[0] != "running":
                self.fail(f"{c.label} exited ({' '.join(st) or 'gone'})", c)

    def graceful_stop(self, containers: list[Container]) -> None:
        """SIGTERM as the kubelet sends it, reporting how long each container takes to exit."""
        def stop_one(c: Container):
            grace = min(int(c.pod.spec.get("terminationGracePeriodSeconds", 30)), self.args.stop_cap)
            t = time.monotonic()
            podman("stop", "-t", str(grace), c.cname, check=False, timeout=grace + 60)
            took = time.monotonic() - t
            code = podman("inspect", c.cname, "--format", "{{.State.ExitCode}}", check=False).stdout.strip()
            killed = took >= grace - 0.5
            log(f"{c.label}: SIGTERM -> exited {code} after {took:.1f}s"
                + (f" (did not exit within {grace}s: SIGKILLed)" if killed else ""))
            if took > 10:
                self.print_logs(c.cname, 15)  # why it took long
        ts = [threading.Thread(target=stop_one, args=(c,)) for c in reversed(containers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def cleanup(self) -> None:
        if self.args.keep:
            log(f"--keep: containers {self.started}, network {self.network}, files in {self.work} left")
            return
        for name in reversed(self.started):
            podman("rm", "-f", "-t", "0", name, check=False, timeout=120)
        if self.network_made:
            podman("network", "rm", "-f", self.network, check=False, timeout=120)
        shutil.rmtree(self.work, ignore_errors=True)
        log(f"cleaned up: {len(self.started)} containers"
            + (f", network {self.network}" if self.network_made else "") + f", {self.work}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default="vision")
    ap.add_argument("--namespace", default="loupe")
    ap.add_argument("--set", action="append", help="extra helm --set (repeatable)")
    ap.add_argument("--set-json", action="append", help="extra helm --set-json (repeatable)")
    ap.add_argument("-f", "--values", action="append", help="extra values file, after this script's (repeatable)")
    ap.add_argument("--redis-image", default=REDIS_IMAGE)
    ap.add_argument("--s3-image", default=S3_IMAGE)
    ap.add_argument("--tls", action="store_true",
                    help="tls.enabled with a test CA and certificate in a Secret (the probes are then httpGet)")
    ap.add_argument("--liveness-periods", type=int, default=3, help="liveness passes needed after start-up (3)")
    ap.add_argument("--ready-timeout", type=float, default=300, help="seconds after start-up for readiness (300)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for everything to be ready and live (900)")
    ap.add_argument("--exec-overhead", type=float, default=10,
                    help="seconds allowed on top of an exec probe's timeoutSeconds for podman exec itself (10)")
    ap.add_argument("--stop-cap", type=int, default=60, help="cap on the grace period at the end (60)")
    ap.add_argument("--startup-cap", type=float, default=600, help="seconds an init container may run (600)")
    ap.add_argument("--keep", action="store_true", help="leave containers, network and files (debugging)")
    args = ap.parse_args()
    os.environ.setdefault("CONTAINERS_CONF", os.path.join(ROOT, "tools", "images", "containers.conf"))
    if os.geteuid() != 0:
        print("run-chart.py needs root (rootful podman, so that this host reaches the containers)", file=sys.stderr)
        return 2
    r = Runner(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    code = 1
    try:
        code = r.main()
    except Failure as e:
        if r.failure is None:
            r.failure = str(e).splitlines()[0]
            log(f"FAIL {e}")
        code = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'})")
        code = 130
    finally:
        r.stop.set()
        r.cleanup()
    log("chart containers: " + ("OK" if code == 0 else f"FAILED: {r.failure or 'see above'}"))
    return code


if __name__ == "__main__":
    sys.exit(main())
