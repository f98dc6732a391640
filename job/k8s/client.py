"""Cluster access for the ops commands, through the official client and nothing else.

Configuration is resolved the way kubectl and helm resolve it (``$KUBECONFIG`` or
``~/.kube/config``, else the pod's service account), so `sftjob` and the `helm` it runs act on the
same cluster and namespace. Every API call goes through :func:`Kube.call`, which turns the
client's exceptions into the project's errors: a refusal names the verb and resource that RBAC
refused (exit 77), an unreachable cluster is exit 69, a missing object exit 66, and no cluster
configured at all (no kubeconfig, not in a pod) exit 64.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from job.errors import ConfigError, NotFoundError, PermissionDeniedError, SftjobError, UnavailableError

log = logging.getLogger(__name__)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SA_TOKEN = SA_NAMESPACE.with_name("token")  # what load_incluster_config reads
TIMEOUT = (10, 60)  # connect, read (seconds) for every non-streaming call


def _server_reason(body: str | None) -> str:
    try:
        return json.loads(body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return (body or "").strip()[:300]


def _no_cluster() -> ConfigError:
    """Nothing to connect to is a setup problem (64), not an outage (69): retrying cannot fix it."""
    env = os.environ.get("KUBECONFIG")
    home = os.path.expanduser("~/.kube/config")
    return ConfigError(
        "no Kubernetes cluster configured; looked for:\n"
        + (f"  KUBECONFIG={env}: no such file\n  ~/.kube/config: not read when KUBECONFIG is set\n" if env else
           f"  KUBECONFIG: not set\n  ~/.kube/config: {home} does not exist\n")
        + f"  in-cluster service account: not in a pod (KUBERNETES_SERVICE_HOST not set; token {SA_TOKEN})",
        hint="point KUBECONFIG (or ~/.kube/config) at your cluster's kubeconfig (`kubectl config view` "
             "should show it), or run sftjob in a pod with a service account")


class Kube:
    """One resolved cluster connection: API groups as the client exposes them + the namespace."""

    def __init__(self, namespace: str | None = None, *, context: str | None = None):
        from kubernetes import client, config

        kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        ctx_namespace = None
        try:
            if any(Path(p).exists() for p in kubeconfig.split(os.pathsep) if p):
                api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if context:
                    active = next((c for c in contexts if c["name"] == context), active)
                ctx_namespace = (active or {}).get("context", {}).get("namespace")
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                api_client = client.ApiClient(cfg)
                ctx_namespace = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else None
            else:
                raise _no_cluster()
        except (config.ConfigException, yaml.YAMLError, OSError) as e:  # a kubeconfig or token we cannot use
            raise ConfigError(f"cannot load the Kubernetes configuration: {e}",
                              hint="check KUBECONFIG / the current context (`kubectl config view`)") from None
        self.api = api_client
        self.host = api_client.configuration.host
        self.namespace = namespace or ctx_namespace or "default"
        self.context = context
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def call(self, verb: str, resource: str, fn, *args, name: str | None = None,
             optional: bool = False, stream: bool = False, **kwargs) -> Any:
        """Run one client call and return the decoded JSON (a dict), or the raw response when
        stream=True. With optional=True a 403/404 returns None: the view degrades, it does not fail."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_preload_content", False)
        if not stream:
            kwargs.setdefault("_request_timeout", TIMEOUT)
        where = f'in namespace "{self.namespace}"'
        try:
            resp = fn(*args, **kwargs)
            return resp if stream else json.loads(resp.data or b"null")
        except ApiException as e:
            reason = _server_reason(e.body)
            if optional and e.status in (403, 404):
                log.debug("%s %s: %s (ignored)", verb, resource, reason)
                return None
            if e.status == 403:
                raise PermissionDeniedError(f"forbidden: cannot {verb} {resource} {where}\n  server: {reason}",
                                            hint=f"ask for a Role that allows '{verb}' on '{resource}' "
                                                 f"in {self.namespace}, or use another --namespace") from None
            if e.status == 401:
                raise PermissionDeniedError(f"unauthorized: {self.host} rejected the credentials ({reason})",
                                            hint="log in again / refresh the kubeconfig token") from None
            if e.status == 404:
                what = f'{resource} "{name}"' if name else resource
                raise NotFoundError(f"{what} not found {where}",
                                    hint="check the name and --namespace (`sftjob list`)") from None
            if e.status == 0 or e.status >= 500:
                raise UnavailableError(f"Kubernetes API {self.host} failed to {verb} {resource}: "
                                       f"{e.status} {reason or e.reason}", hint="retry later") from None
            raise ConfigError(f"cannot {verb} {resource} {where}: {e.status} {reason or e.reason}") from None
        except HTTPError as e:
            raise UnavailableError(f"cannot reach the Kubernetes API at {self.host}: {type(e).__name__}: {e}",
                                   hint="check the cluster address, VPN and `kubectl cluster-info`") from None
        except SftjobError:
            raise
        except OSError as e:
            raise UnavailableError(f"cannot reach the Kubernetes API at {self.host}: {e}") from None
