"""Checks the credentials and NetworkPolicies of the renders tools/check-chart.sh wrote
to the directory given as argv[1] (default.yaml, gpu.yaml, external-redis-ha.yaml):
which token Secret each pod mounts, which Secrets the chart generates, and whom each
NetworkPolicy admits. Exits non-zero naming the first thing that is wrong."""

import sys
from pathlib import Path

import yaml

FULLNAME = "vision-loupe"


def load(render_dir, name):
    docs = yaml.safe_load_all((Path(render_dir) / f"{name}.yaml").read_text())
    return [d for d in docs if d]


def find(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        sys.exit(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def mounted_secrets(docs, component):
    pod = find(docs, "Deployment", f"{FULLNAME}-{component}")["spec"]["template"]["spec"]
    return {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v and "token" in v["name"]}


def env(docs, component):
    pod = find(docs, "Deployment", f"{FULLNAME}-{component}")["spec"]["template"]["spec"]
    return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}


def expect(cond, what):
    if not cond:
        sys.exit(f"FAIL {what}")


def check_default(docs):
    user, worker = f"{FULLNAME}-user-token", f"{FULLNAME}-worker-token"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    expect(set(secrets) == {user, worker}, f"default: the chart generates the two token Secrets, not {sorted(secrets)}")
    tokens = [secrets[n]["data"]["token"] for n in (user, worker)]
    expect(all(len(t) >= 40 for t in tokens) and tokens[0] != tokens[1], "default: two distinct 32-character tokens")
    expect(mounted_secrets(docs, "coordinator") == {user, worker}, "default: the coordinator mounts both tokens")
    expect(mounted_secrets(docs, "worker") == {worker}, "default: a worker mounts the worker token and never the user token")
    c = env(docs, "coordinator")
    expect(c.get("LOUPE_USER_TOKEN_FILE") and c.get("LOUPE_WORKER_TOKEN_FILE"), "default: the coordinator reads both tokens")
    expect("LOUPE_INSECURE_NO_AUTH" not in c, "default: auth is on")
    expect(env(docs, "worker").get("LOUPE_TOKEN_FILE") == "/etc/loupe/worker-token/token", "default: the worker's token file")

    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]
    expect(policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "coordinator", "the policy selects the coordinator")
    expect(policy["policyTypes"] == ["Ingress"], "the coordinator policy restricts ingress")
    expect(len(policy["ingress"]) == 1, "default: nothing reaches the metrics port (no metricsScrapers)")
    rule = policy["ingress"][0]
    expect([p["port"] for p in rule["ports"]] == ["grpc"], "default: the one rule is for the gRPC port")
    expect(len(rule["from"]) == 1 and rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker",
           "default: only the worker pods reach the gRPC port")
    redis = find(docs, "NetworkPolicy", f"{FULLNAME}-redis")["spec"]["ingress"]
    expect([f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in redis for f in r["from"]] == ["coordinator"],
           "default: only the coordinator reaches Redis")


def check_given_secrets(docs):
    expect(not [d for d in docs if d["kind"] == "Secret"], "gpu: given Secrets, the chart generates none")
    expect(mounted_secrets(docs, "coordinator") == {"loupe-user-token", "loupe-worker-token"}, "gpu: the coordinator mounts the given Secrets")
    expect(mounted_secrets(docs, "worker") == {"loupe-worker-token"}, "gpu: a worker mounts only the given worker Secret")


def check_clients(docs):
    rules = find(docs, "NetworkPolicy", f"{FULLNAME}-coordinator")["spec"]["ingress"]
    grpc = next(r for r in rules if r["ports"][0]["port"] == "grpc")
    metrics = next(r for r in rules if r["ports"][0]["port"] == "metrics")
    ns = lambda peer: peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
    expect([ns(p) for p in grpc["from"]] == [None, "ml"], "external-redis-ha: the workers and the ml namespace reach the gRPC port")
    expect([ns(p) for p in metrics["from"]] == ["monitoring"], "external-redis-ha: the monitoring namespace reaches the metrics port")


render_dir = sys.argv[1]
check_default(load(render_dir, "default"))
check_given_secrets(load(render_dir, "gpu"))
check_clients(load(render_dir, "external-redis-ha"))
print("credentials and NetworkPolicies: as the values say")
