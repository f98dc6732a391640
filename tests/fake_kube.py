"""A small fake Kubernetes API server for the ops tests (no kube-apiserver can run here).

It speaks the real wire protocol over plain HTTP, so the real clients talk to it unchanged: the
`helm` binary (discovery, release Secrets, creating and deleting the rendered objects) and the
official `kubernetes` Python client that `sftjob` uses (Jobs, Pods, pod logs, Events, Kueue
Workloads). There are no controllers: a test plays the Job controller, kubelet and Kueue through
the helpers at the bottom (``on_create``, ``run_pod``, ``finish_pod``, ``set_condition``).
RBAC is reduced to a deny list, which answers 403 with the apiserver's own message format;
:func:`attributes` gives any request the (verb, group, resource) that real RBAC would check, so a
test can compare what was sent with a Role (tests/test_rbac.py).
"""
from __future__ import annotations

import base64
import copy
import itertools
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlparse

# plural → (group, version, kind, namespaced)
RESOURCES = {
    "namespaces": ("", "v1", "Namespace", False),
    "pods": ("", "v1", "Pod", True),
    "configmaps": ("", "v1", "ConfigMap", True),
    "secrets": ("", "v1", "Secret", True),
    "services": ("", "v1", "Service", True),
    "serviceaccounts": ("", "v1", "ServiceAccount", True),
    "events": ("", "v1", "Event", True),
    "persistentvolumeclaims": ("", "v1", "PersistentVolumeClaim", True),
    "jobs": ("batch", "v1", "Job", True),
    "poddisruptionbudgets": ("policy", "v1", "PodDisruptionBudget", True),
    "networkpolicies": ("networking.k8s.io", "v1", "NetworkPolicy", True),
    "roles": ("rbac.authorization.k8s.io", "v1", "Role", True),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", "RoleBinding", True),
    "workloads": ("kueue.x-k8s.io", "v1beta1", "Workload", True),
    "localqueues": ("kueue.x-k8s.io", "v1beta1", "LocalQueue", True),
    "podgroups": ("scheduling.volcano.sh", "v1beta1", "PodGroup", True),
}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def _merge(target, patch):
    """RFC 7386 JSON merge patch (also used for strategic merge patches: lists are replaced).
    JSON patch is refused with 415, so a client that sends it by default fails loudly here."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


class Attributes(NamedTuple):
    """What the apiserver's RBAC authorizer is asked about one request (its RequestInfo)."""
    verb: str
    group: str
    resource: str  # with the subresource: "pods/log"
    namespace: str  # "" at the cluster scope
    name: str | None


def attributes(method: str, path: str) -> Attributes | None:
    """The RBAC attributes of a request, derived from its method and URL the way kube-apiserver does;
    None for discovery, /version and /openapi (non-resource URLs every user may read)."""
    url = urlparse(path)
    parts = [p for p in url.path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    ns = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest:
        return None
    resource, name, sub = (rest + [None, None])[:3]
    verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}[method]
    if method == "GET" and parse_qs(url.query).get("watch", [""])[-1] in ("1", "true"):
        verb = "watch"
    return Attributes(verb, group, f"{resource}/{sub}" if sub else resource, ns, name)


def _dig(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _label_match(labels: dict, selector: str) -> bool:
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector or ""):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in vals) != (op == "in"):
                return False
        elif "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = re.split("==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(obj: dict, selector: str) -> bool:
    for term in filter(None, (selector or "").split(",")):
        neg = "!=" in term
        k, v = re.split("!=|==?", term, maxsplit=1)
        if (str(_dig(obj, k.strip()) or "") == v.strip()) == neg:
            return False
    return True


def _fields(buf: bytes):
    """Protobuf wire format → (field number, value) pairs (varints as int, the rest as bytes)."""
    i = 0

    def varint():
        nonlocal i
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out
    while i < len(buf):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, varint()
        elif wire == 2:
            n = varint()
            yield num, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _from_protobuf(raw: bytes) -> dict:
    """Helm's release storage writes Secrets (or, with HELM_DRIVER=configmap, ConfigMaps) as protobuf,
    as client-go does for built-in types; decode the fields helm sets: metadata name/namespace/labels,
    data, type, immutable."""
    assert raw[:4] == b"k8s\x00", "not a Kubernetes protobuf envelope"
    envelope = dict(_fields(raw[4:]))  # runtime.Unknown: 1 typeMeta (1 apiVersion, 2 kind), 2 raw
    kind = dict(_fields(envelope.get(1, b""))).get(2, b"Secret").decode()
    assert kind in ("Secret", "ConfigMap"), f"unsupported protobuf kind {kind}"
    inner = envelope[2]
    secret: dict = {"apiVersion": "v1", "kind": kind, "metadata": {}, "data": {}}
    immutable = 5 if kind == "Secret" else 4  # ConfigMap: 2 data (strings), 3 binaryData, 4 immutable

    def entry(b):
        kv = dict(_fields(b))
        return kv.get(1, b"").decode(), kv.get(2, b"")
    for num, val in _fields(inner):
        if num == 1:
            meta = secret["metadata"]
            for mnum, mval in _fields(val):
                names = {1: "name", 2: "generateName", 3: "namespace", 6: "resourceVersion"}
                if mnum in names:
                    meta[names[mnum]] = mval.decode()
                elif mnum in (11, 12):
                    k, v = entry(mval)
                    meta.setdefault("labels" if mnum == 11 else "annotations", {})[k] = v.decode()
        elif num == 2:
            k, v = entry(val)
            secret["data"][k] = base64.b64encode(v).decode() if kind == "Secret" else v.decode()
        elif num == 3 and kind == "Secret":
            secret["type"] = val.decode()
        elif num == immutable:
            secret["immutable"] = bool(val)
    return secret


class FakeKube:
    """The server and its state; use as a context manager or call start()/stop()."""

    def __init__(self, user: str = "system:serviceaccount:ml:ci"):
        self.user = user
        self.store: dict[str, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self.logs: dict[tuple[str, str], str] = {}
        self.deny: set[tuple[str, str]] = set()  # (verb, resource) refused with 403
        self.requests: list[tuple[str, str]] = []
        self.hooks: list = []  # fn(fake, resource, obj) run in a thread after a create
        self.lock = threading.RLock()
        self._rv = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "ci", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ci", "namespace": namespace}}],
        }))
        return path

    def rbac_requests(self) -> list[Attributes]:
        """Every resource request received so far, as RBAC sees it (discovery left out)."""
        return [a for m, p in list(self.requests) if (a := attributes(m, p))]

    # ---- state ----------------------------------------------------------------------------
    def get(self, resource: str, ns: str, name: str) -> dict | None:
        with self.lock:
            return copy.deepcopy(self.store[resource].get((ns, name)))

    def list(self, resource: str, ns: str | None = None, selector: str = "") -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (n, _), o in sorted(self.store[resource].items())
                    if (ns is None or n == ns) and _label_match(o["metadata"].get("labels") or {}, selector)]

    def create(self, resource: str, obj: dict, ns: str = "") -> dict:
        group, version, kind, namespaced = RESOURCES[resource]
        with self.lock:
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["namespace"] = (ns or meta.get("namespace") or "default") if namespaced else None
            if not namespaced:
                meta.pop("namespace")
            key = (meta.get("namespace", ""), meta["name"])
            if key in self.store[resource]:
                raise KeyError(key)
            obj.update(apiVersion=f"{group}/{version}".lstrip("/"), kind=kind)
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)),
                        creationTimestamp=now(), generation=1)
            self.store[resource][key] = obj
        for hook in list(self.hooks):
            threading.Thread(target=hook, args=(self, resource, copy.deepcopy(obj)), daemon=True).start()
        return copy.deepcopy(obj)

    def update(self, resource: str, ns: str, name: str, fn) -> dict:
        """Change a stored object in place (fn(obj) mutates it): the tests' controller hook."""
        with self.lock:
            obj = self.store[resource][(ns, name)]
            fn(obj)
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            return copy.deepcopy(obj)

    def delete(self, resource: str, ns: str, name: str) -> dict | None:
        with self.lock:
            obj = self.store[resource].pop((ns, name), None)
            if obj is not None and resource == "jobs":  # what the garbage collector does
                for pod in self.list("pods", ns, f"job-name={name}"):
                    self.store["pods"].pop((ns, pod["metadata"]["name"]), None)
            return obj

    # ---- the tests' controller, kubelet and Kueue ------------------------------------------
    def on_create(self, resource: str, fn) -> None:
        """Run fn(fake, obj) in a thread whenever an object of this resource is created."""
        self.hooks.append(lambda fake, res, obj: fn(fake, obj) if res == resource else None)

    def run_pod(self, ns: str, job: str, index: int = 0, log: str = "") -> str:
        """A Running pod of an Indexed Job, named and labelled as the Job controller does."""
        job_obj = self.get("jobs", ns, job)
        container = job_obj["spec"]["template"]["spec"]["containers"][0]["name"]
        pod = self.create("pods", {"metadata": {
            "generateName": f"{job}-{index}-",
            "labels": {"job-name": job, "batch.kubernetes.io/job-name": job,
                       "batch.kubernetes.io/job-completion-index": str(index),
                       "controller-uid": job_obj["metadata"]["uid"]},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                 "uid": job_obj["metadata"]["uid"], "controller": True}]},
            "spec": {"restartPolicy": "Never", "containers": [{"name": container, "image": "sftjob"}]},
            "status": {"phase": "Running", "startTime": now(), "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": container, "ready": True, "restartCount": 0,
                                              "state": {"running": {"startedAt": now()}}}]}}, ns)
        name = pod["metadata"]["name"]
        self.logs[(ns, name)] = log
        self.update("jobs", ns, job, lambda j: j.setdefault("status", {}).update(
            active=j.get("status", {}).get("active", 0) + 1, startTime=j.get("status", {}).get("startTime", now())))
        time.sleep(0.02)  # distinct creation order for pods started back to back
        return name

    def finish_pod(self, ns: str, pod: str, exit_code: int, message: str = "",
                   disruption: str | None = None) -> None:
        """The container exits; the pod's phase follows; with disruption, a DisruptionTarget condition."""
        def fn(p):
            st = p["status"]
            st["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            cs = st["containerStatuses"][0]
            cs.update(ready=False, state={"terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                "message": message, "startedAt": cs["state"].get("running", {}).get("startedAt", now()),
                "finishedAt": now()}})
            st["conditions"] = [{"type": "Ready", "status": "False"}]
            if disruption:
                st["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                         "message": f"{disruption}: pod evicted", "lastTransitionTime": now()})
        p = self.update("pods", ns, pod, fn)
        job = p["metadata"]["labels"]["job-name"]
        key = "succeeded" if exit_code == 0 else "failed"
        self.update("jobs", ns, job, lambda j: j["status"].update(
            active=max(0, j["status"].get("active", 0) - 1), **{key: j["status"].get(key, 0) + 1}))

    def set_condition(self, ns: str, job: str, type_: str, reason: str = "", message: str = "") -> None:
        def fn(j):
            st = j.setdefault("status", {})
            conds = [c for c in st.get("conditions", []) if c["type"] != type_]
            conds.append({"type": type_, "status": "True", "reason": reason, "message": message,
                          "lastProbeTime": now(), "lastTransitionTime": now()})
            st["conditions"] = conds
            if type_ in ("Complete", "Failed"):
                st["completionTime"] = now() if type_ == "Complete" else st.get("completionTime")
        self.update("jobs", ns, job, fn)

    def add_event(self, ns: str, kind: str, name: str, reason: str, message: str, type_: str = "Normal") -> None:
        self.create("events", {"metadata": {"generateName": f"{name}."}, "type": type_, "reason": reason,
                               "message": message, "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                               "lastTimestamp": now(), "firstTimestamp": now(), "count": 1}, ns)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def fake(self) -> FakeKube:
        return self.server.fake  # type: ignore[attr-defined]

    def _send(self, code: int, body, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        raw = self._raw
        if "protobuf" in self.headers.get("Content-Type", ""):
            return _from_protobuf(raw)
        return json.loads(raw) if raw else None

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_PATCH(self):
        self._route("PATCH")

    def do_DELETE(self):
        self._route("DELETE")

    # ---- routing ----------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        self.fake.requests.append((method, self.path))
        n = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(n) if n else b""  # always drained: DELETE carries options
        if method == "GET" and (disc := self._discovery(parts)) is not None:
            return self._send(200, disc)
        a = attributes(method, self.path)
        resource = a.resource.split("/")[0] if a else None
        if resource not in RESOURCES:
            return self._send(404, _status(404, "NotFound", f"the server could not find the requested resource ({self.path})"))
        verb, ns, name, res_name = a.verb, a.namespace, a.name, a.resource
        sub = res_name.partition("/")[2] or None
        group = RESOURCES[resource][0]
        if (verb, res_name) in self.fake.deny or (verb, "*") in self.fake.deny:
            what = f'{resource}{"." + group if group else ""}' + (f' "{name}"' if name else "")
            where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
            msg = (f'{what} is forbidden: User "{self.fake.user}" cannot {verb} resource "{res_name}" '
                   f'in API group "{group}"{where}')
            return self._send(403, _status(403, "Forbidden", msg, {"name": name or "", "group": group, "kind": resource}))
        if verb == "watch":
            return self._send(405, _status(405, "MethodNotAllowed", "this fake server does not serve watches"))
        return self._crud(method, resource, ns, name, sub, q)

    def _discovery(self, parts: list[str]):
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if parts == ["version"]:
            return {"major": "1", "minor": "34", "gitVersion": "v1.34.0", "platform": "linux/amd64"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
        if parts == ["apis"]:
            groups = sorted({(g, v) for g, v, _, _ in RESOURCES.values() if g})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}
        if parts[:2] == ["openapi", "v3"]:
            return self._openapi_v3(parts[2:])
        gv = "v1" if parts == ["api", "v1"] else "/".join(parts[1:]) if parts[:1] == ["apis"] and len(parts) == 3 else None
        if gv is None:
            return None
        resources = []
        for plural, (g, v, kind, namespaced) in RESOURCES.items():
            if f"{g}/{v}".lstrip("/") == gv:
                resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced,
                                  "kind": kind, "verbs": VERBS})
                for sub in ("status",) + (("log",) if plural == "pods" else ()):
                    resources.append({"name": f"{plural}/{sub}", "singularName": "", "namespaced": namespaced,
                                      "kind": kind if sub == "status" else "Pod", "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources} if resources else None

    def _openapi_v3(self, parts: list[str]):
        """Just enough OpenAPI v3 for client-go to see that the server validates fields itself
        (a PATCH operation per kind with the fieldValidation parameter), so helm sends
        ?fieldValidation=Strict instead of validating against full schemas client-side."""
        gvs = sorted({(g, v) for g, v, _, _ in RESOURCES.values()})
        key = lambda g, v: f"apis/{g}/{v}" if g else f"api/{v}"  # noqa: E731
        if not parts:
            return {"paths": {key(g, v): {"serverRelativeURL": f"/openapi/v3/{key(g, v)}?hash=0"} for g, v in gvs}}
        paths = {}
        for plural, (g, v, kind, namespaced) in RESOURCES.items():
            if key(g, v) == "/".join(parts):
                base = f"/{key(g, v)}/" + ("namespaces/{namespace}/" if namespaced else "")
                paths[base + plural + "/{name}"] = {"patch": {
                    "x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": kind},
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}}}}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.34.0"}, "paths": paths} if paths else None

    def _crud(self, method, resource, ns, name, sub, q) -> None:
        fake = self.fake
        group, version, kind, _ = RESOURCES[resource]
        not_found = _status(404, "NotFound", f'{resource}{"." + group if group else ""} "{name}" not found',
                            {"name": name, "group": group, "kind": resource})
        if method == "GET" and not name:
            items = [o for o in fake.list(resource, ns or None, q.get("labelSelector", ""))
                     if _field_match(o, q.get("fieldSelector", ""))]
            return self._send(200, {"kind": f"{kind}List", "apiVersion": f"{group}/{version}".lstrip("/"),
                                    "metadata": {"resourceVersion": str(next(fake._rv))}, "items": items})
        if method == "GET" and sub == "log":
            return self._log(ns, name, q)
        if method == "POST":
            body = self._body()
            if q.get("dryRun"):
                return self._send(201, body)
            try:
                return self._send(201, fake.create(resource, body, ns))
            except KeyError:
                return self._send(409, _status(409, "AlreadyExists",
                                               f'{resource}{"." + group if group else ""} "{body["metadata"]["name"]}" already exists'))
        obj = fake.get(resource, ns, name)
        if obj is None:
            return self._send(404, not_found)
        if method == "GET":
            return self._send(200, obj)
        if method == "DELETE":
            return self._send(200, fake.delete(resource, ns, name))
        body = self._body()
        if method == "PUT":
            new = body
        else:
            ctype = self.headers.get("Content-Type", "")
            if "merge-patch" in ctype:
                new = _merge(obj, body)
            else:
                return self._send(415, _status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}"))
        if sub == "status":
            new = {**obj, "status": new.get("status", {})}
        elif "status" in obj:
            new["status"] = obj["status"]
        keep = ("name", "namespace", "uid", "creationTimestamp")
        new["metadata"] = {**new.get("metadata", {}), **{k: obj["metadata"][k] for k in keep if k in obj["metadata"]}}
        new.update(apiVersion=obj["apiVersion"], kind=kind)
        return self._send(200, fake.update(resource, ns, name, lambda o: (o.clear(), o.update(new))))

    def _log(self, ns: str, name: str, q: dict) -> None:
        """Pod logs; with follow=true the body streams (chunked) until the pod terminates."""
        fake = self.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        follow = q.get("follow") in ("true", "1")
        text = fake.logs.get((ns, name), "")
        sent = len(text) - len("".join(text.splitlines(keepends=True)[-int(q["tailLines"]):])) \
            if q.get("tailLines") else 0
        while True:
            pod = fake.get("pods", ns, name)
            text = fake.logs.get((ns, name), "")
            if chunk := text[sent:].encode():
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                sent = len(text)
            if not follow or not pod or pod["status"]["phase"] in ("Succeeded", "Failed"):
                break
            time.sleep(0.02)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
