"""Kubernetes manifests for the CPU rollout fleet (plain dicts -> multi-document YAML).

The fleet is JAX-free (`pip install klong-jax[fleet]` in the image); each worker pod runs
`python -m klong_jax.rollout.worker` against one inference server and writes trajectory shards
to a `gs://` stream through the GCS JSON API (google-cloud-storage): groups are claimed with
create-if-absent preconditions (gcsfuse has no hard links, so the POSIX claim cannot work there),
claims carry a renewed lease, and a shard is uploaded once, visible only when complete. The pod's
ServiceAccount needs object create/get/list/delete on the bucket (roles/storage.objectUser via
Workload Identity). The GKE GCS FUSE CSI mount at /gcs remains only for read-only inputs (task
dirs, tokenizer). Workers are named after their pod (`--worker=$(WORKER_POD)`).

Sandbox runtimes (`RUNTIMES`): `docker-socket` mounts the node's
Docker socket (fast, but a pod can reach every container on the node), `sysbox` runs a private
dockerd inside each pod under the sysbox-runc RuntimeClass (no privileged pods), `gvisor` runs the
pod under runsc and executes tasks with the worker's `local` backend inside that sandbox.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import yaml

STREAM_MOUNT = "/gcs"  # Read-only gcsfuse view of the bucket (tasks, tokenizer); not the stream.

# runtime -> (RuntimeClass name or None, worker --backend, needs the host docker socket).
RUNTIMES: dict[str, tuple[str | None, str, bool]] = {
    "docker-socket": (None, "docker", True),
    "sysbox": ("sysbox-runc", "docker", False),
    "gvisor": ("gvisor", "local", False),
}


@dataclasses.dataclass(frozen=True)
class FleetSpec:
  """What the fleet needs: image, replica count, per-pod resources, runtime, bucket, namespace."""

  name: str
  image: str
  replicas: int
  bucket: str
  runtime: str = "sysbox"
  namespace: str = "klong"
  cpu: str = "4"
  memory: str = "16Gi"
  ephemeral_storage: str = "50Gi"

  def __post_init__(self):
    if self.runtime not in RUNTIMES:
      raise ValueError(f"sandbox runtime {self.runtime!r} unknown; "
                       f"choose one of {sorted(RUNTIMES)}")
    if self.replicas < 1:
      raise ValueError(f"fleet replicas={self.replicas}; need at least 1 worker pod")
    if not self.bucket or "/" in self.bucket:
      raise ValueError(f"bucket {self.bucket!r} must be a bare GCS bucket name (from gs://NAME/...)")


def backend(runtime: str) -> str:
  """The worker's --backend for a sandbox runtime."""
  return RUNTIMES[runtime][1]


def namespace(spec: FleetSpec) -> dict[str, Any]:
  return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace}}


def service_account(spec: FleetSpec) -> dict[str, Any]:
  """The pods' KSA; bind it to a GCP service account with bucket access (Workload Identity)."""
  return {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": f"{spec.name}-worker", "namespace": spec.namespace}}


def worker_deployment(spec: FleetSpec, name: str, replicas: int, args: list[str]
                      ) -> dict[str, Any]:
  """One Deployment of `replicas` identical worker pods running `args` (a full argv)."""
  runtime_class, _, docker_socket = RUNTIMES[spec.runtime]
  labels = {"app": spec.name, "role": "rollout-worker", "deployment": name}
  volumes: list[dict[str, Any]] = [{
      "name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
                             "volumeAttributes": {"bucketName": spec.bucket,
                                                  "mountOptions": "implicit-dirs"}}}]
  mounts: list[dict[str, Any]] = [{"name": "gcs", "mountPath": STREAM_MOUNT, "readOnly": True}]
  if docker_socket:
    volumes.append({"name": "docker-sock",
                    "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}})
    mounts.append({"name": "docker-sock", "mountPath": "/var/run/docker.sock"})
  res = {"cpu": spec.cpu, "memory": spec.memory, "ephemeral-storage": spec.ephemeral_storage}
  container = {
      "name": "worker", "image": spec.image,
      "command": ["/bin/sh", "-c", startup_script(spec.runtime, args)],
      "env": [{"name": "WORKER_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
              {"name": "PYTHONUNBUFFERED", "value": "1"}],
      "resources": {"requests": res, "limits": res},
      "volumeMounts": mounts}
  pod: dict[str, Any] = {
      "serviceAccountName": f"{spec.name}-worker",
      "terminationGracePeriodSeconds": 60,
      "containers": [container], "volumes": volumes}
  if runtime_class:
    pod["runtimeClassName"] = runtime_class
  return {
      "apiVersion": "apps/v1", "kind": "Deployment",
      "metadata": {"name": name, "namespace": spec.namespace, "labels": labels},
      "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
               "template": {"metadata": {"labels": labels,
                                         "annotations": {"gke-gcsfuse/volumes": "true"}},
                            "spec": pod}}}


def startup_script(runtime: str, args: list[str]) -> str:
  """The pod's shell command: start dockerd (sysbox), ensure the sandbox image, exec the worker.

  The sandbox image (`klong_jax.sandbox.image`, tagged by a content hash of sandbox/) is built
  into the Docker daemon the worker uses when missing: once per node with the host socket, once
  per pod with sysbox; gVisor pods run tasks with the `local` backend and need no image.
  """
  worker = "exec " + shlex.join(args)
  ensure = "python3 -m klong_jax.sandbox.image --ensure && "
  if runtime == "docker-socket":
    return ensure + worker
  if runtime == "sysbox":
    return ("dockerd > /tmp/dockerd.log 2>&1 & until docker info > /dev/null 2>&1; do sleep 1; "
            "done; " + ensure + worker)
  return worker


def split_replicas(total: int, parts: int) -> list[int]:
  """`total` pods over `parts` deployments as evenly as possible (earlier ones get the rest)."""
  if parts < 1:
    raise ValueError(f"need at least one inference server for the fleet, got {parts}")
  return [total // parts + (i < total % parts) for i in range(parts)]


def to_yaml(objects: list[dict[str, Any]]) -> str:
  """Multi-document YAML, in order (`kubectl apply -f` takes it as is)."""
  return yaml.dump_all(objects, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


class _NoAliasDumper(yaml.SafeDumper):
  """Writes repeated sub-dicts in full (no &id001 anchors) so manifests read plainly."""

  def ignore_aliases(self, data: Any) -> bool:
    return True
