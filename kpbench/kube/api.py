"""The narrow Kubernetes API the driver needs, and its implementation over the Python client.

`KubeApi` is the whole surface the driver (`kpbench.kube.driver`) touches: objects are plain
dicts in the API's JSON shape (camelCase), so an in-memory double can stand in for a cluster in
the offline tests (`tests/kind_double.py`). `RestKubeApi` implements it with the official
`kubernetes` client (kubernetes-client/python): its `ApiClient` handles the kubeconfig's
credentials and TLS, requests go to the documented REST paths (server-side apply as `PATCH` with
`application/apply-patch+yaml`, the `scale` subresource, pod `proxy` and `exec`, watches with
`?watch=1`), and responses stay JSON. A kubeconfig file is loaded explicitly
(`new_client_from_config(config_file=...)`, nothing persisted), so the user's kubeconfig and
current context are never read or changed unless the user passes that very file.

Not verifiable on the development machine (no cluster): everything in `RestKubeApi`; it runs in
the end-to-end test (`nox -s e2e-kind`).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

# (API path prefix, plural, namespaced) per kind; the kinds kpbench creates or reads.
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Pod": ("/api/v1", "pods", True),
    "Node": ("/api/v1", "nodes", False),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "APIService": ("/apis/apiregistration.k8s.io/v1", "apiservices", False),
    "PodMetrics": ("/apis/metrics.k8s.io/v1beta1", "pods", True),
    "NodeMetrics": ("/apis/metrics.k8s.io/v1beta1", "nodes", False),
}
FIELD_MANAGER = "kpbench"


class KubeError(RuntimeError):
    """An API request failed; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KubeApi(Protocol):
    """What the kind / cluster driver needs from Kubernetes, and nothing more."""

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create or update the object (server-side apply)."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""

    def list_objects(self, kind: str, namespace: str,
                     selector: str = "") -> list[dict[str, Any]]:
        """Objects of a kind in a namespace ("" for cluster-scoped kinds), by label selector."""

    def delete(self, kind: str, namespace: str, name: str,
               grace_seconds: int | None = None) -> None:
        """Delete; a missing object is not an error."""

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Strategic-merge patch."""

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set `spec.replicas` through the Deployment's `scale` subresource."""

    def proxy(self, method: str, namespace: str, pod: str, port: int, path: str,
              form: dict[str, str] | None = None, timeout: float = 5.0) -> str:
        """An HTTP request to a pod's port through the API server's pod proxy."""

    def exec(self, namespace: str, pod: str, container: str, command: list[str]) -> str:
        """Run a command in a container; its stdout."""

    def watch(self, kind: str, namespace: str, selector: str,
              timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(ADDED|MODIFIED|DELETED, object) from now on, for at most `timeout_seconds`."""


def resource_path(kind: str, namespace: str = "", name: str = "") -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{urllib.parse.quote(namespace)}"
    path += f"/{plural}"
    if name:
        path += f"/{urllib.parse.quote(name)}"
    return path


class RestKubeApi:
    """`KubeApi` over kubernetes-client/python, for one kubeconfig file."""

    def __init__(self, kubeconfig: Path, context: str | None = None) -> None:
        from kubernetes import client, config

        self._client_module = client
        self.api_client = config.new_client_from_config(
            config_file=str(kubeconfig), context=context, persist_config=False
        )
        # `stream()` swaps `call_api` on its ApiClient during an exec: give exec its own client.
        self._exec_client = config.new_client_from_config(
            config_file=str(kubeconfig), context=context, persist_config=False
        )
        self._exec_lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: Any = None, content_type: str | None = None,
                form: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        headers = {"Accept": "application/json, */*"}
        if content_type:
            headers["Content-Type"] = content_type
        post_params = list(form.items()) if form else None
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        method_, url, header_params, serialized, post = self.api_client.param_serialize(
            method=method, resource_path=path,
            query_params=list((query or {}).items()), header_params=headers,
            body=body, post_params=post_params, auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(method_, url, header_params=header_params,
                                                body=serialized, post_params=post,
                                                _request_timeout=timeout)
            data = response.read() or b""
        except Exception as exc:  # urllib3 and client errors alike: one message
            raise KubeError(f"{method} {path}: {exc}") from exc
        if response.status >= 300:
            detail = data.decode(errors="replace")[:300]
            raise KubeError(f"{method} {path}: HTTP {response.status}: {detail}", response.status)
        return response.status, data

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        _, data = self.request(method, path, **kwargs)
        return dict(json.loads(data)) if data else {}

    # -- KubeApi -----------------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> None:
        metadata = manifest["metadata"]
        path = resource_path(manifest["kind"], metadata.get("namespace", ""), metadata["name"])
        self.request("PATCH", path, query={"fieldManager": FIELD_MANAGER, "force": "true"},
                     body=json.dumps(manifest), content_type="application/apply-patch+yaml")

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json("GET", resource_path(kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(self, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        query = {"labelSelector": selector} if selector else None
        return list(self._json("GET", resource_path(kind, namespace), query=query)["items"])

    def delete(self, kind: str, namespace: str, name: str,
               grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", resource_path(kind, namespace, name), body=body,
                         content_type="application/json")
        except KubeError as exc:
            if exc.status != 404:
                raise

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.request("PATCH", resource_path(kind, namespace, name), body=patch,
                     content_type="application/strategic-merge-patch+json")

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        path = resource_path("Deployment", namespace, deployment) + "/scale"
        self.request("PATCH", path, body={"spec": {"replicas": replicas}},
                     content_type="application/merge-patch+json")

    def proxy(self, method: str, namespace: str, pod: str, port: int, path: str,
              form: dict[str, str] | None = None, timeout: float = 5.0) -> str:
        target = resource_path("Pod", namespace, f"{pod}:{port}") + "/proxy/" + path.lstrip("/")
        _, data = self.request(method, target, form=form, timeout=timeout)
        return data.decode(errors="replace")

    def exec(self, namespace: str, pod: str, container: str, command: list[str]) -> str:
        from kubernetes.stream import stream

        core = self._client_module.CoreV1Api(self._exec_client)
        with self._exec_lock:
            output = stream(core.connect_get_namespaced_pod_exec, pod, namespace,
                            command=command, container=container, stderr=True, stdin=False,
                            stdout=True, tty=False)
        return str(output)

    def watch(self, kind: str, namespace: str, selector: str,
              timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        listing = self._json("GET", resource_path(kind, namespace),
                             query={"labelSelector": selector} if selector else None)
        version = listing.get("metadata", {}).get("resourceVersion", "")
        query = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "false",
                 "timeoutSeconds": str(timeout_seconds)}
        if selector:
            query["labelSelector"] = selector
        method_, url, headers, _body, _post = self.api_client.param_serialize(
            method="GET", resource_path=resource_path(kind, namespace),
            query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api_client.rest_client.pool_manager.request(
            method_, url, headers=headers, preload_content=False,
            timeout=timeout_seconds + 10,
        )
        try:
            buffer = b""
            for chunk in response.stream(4096):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            yield event["type"], event["object"]
        finally:
            response.release_conn()

    def close(self) -> None:
        for api_client in (self.api_client, self._exec_client):
            close = getattr(api_client, "close", None)
            if close is not None:
                close()


def cpu_millicores(quantity: str) -> float:
    """A Kubernetes CPU quantity (`250m`, `1`, `12345678n`, `500u`) in millicores."""
    units = {"n": 1e-6, "u": 1e-3, "m": 1.0}
    if quantity and quantity[-1] in units:
        return float(quantity[:-1]) * units[quantity[-1]]
    return float(quantity) * 1000.0


def pod_cpu_millicores(api: KubeApi, namespace: str, selector: str) -> dict[str, float]:
    """Per pod, the CPU metrics-server reports (sum over containers); {} when it has none yet."""
    try:
        items = api.list_objects("PodMetrics", namespace, selector)
    except KubeError:
        return {}
    usage: dict[str, float] = {}
    for item in items:
        total = sum(cpu_millicores(c.get("usage", {}).get("cpu", "0"))
                    for c in item.get("containers", []))
        usage[item["metadata"]["name"]] = total
    return usage
