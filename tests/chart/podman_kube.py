"""Turn the chart's rendered objects into what `podman kube play` (4.3) can run, doing for it the two things
a Kubernetes cluster does that podman does not:

- the StatefulSet controller: podman plays no StatefulSet, so each becomes its pods, named
  ``<statefulset>-<ordinal>`` from the template, with the ``apps.kubernetes.io/pod-index`` label the
  controller adds (the chart picks each pod's token by it);
- the kubelet's Secret volumes: podman 4.3 writes a Secret's values base64-encoded into the files, so each
  Secret volume becomes a host directory holding the decoded keys the volume selects (``items``);
- the kubelet's emptyDir volumes: podman 4.3 makes each a named volume shared by every pod that uses the same
  volume name (two agents' status files would be one file), so each becomes a directory of its own pod;
- no restart of a container that exits while its pod is being deleted: the kubelet restarts none, podman
  (restartPolicy Always) would start the agent again that the preStop hook just stopped. The pods get
  restartPolicy Never, so an agent that exits on its own shows as exited instead.

Everything else (ConfigMaps, env, fieldRef, volumes, security contexts, commands) is played as rendered.
"""

from __future__ import annotations

import base64
import copy
import os
from pathlib import Path

import yaml


def pods_for_podman(objects: list[dict], secrets_dir: Path) -> list[dict]:
    secrets = {}
    for obj in objects:
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
            secrets[obj["metadata"]["name"]] = data
    out: list[dict] = [o for o in objects if o["kind"] == "ConfigMap"]
    for obj in objects:
        if obj["kind"] != "StatefulSet":
            continue
        for ordinal in range(obj["spec"]["replicas"]):
            template = copy.deepcopy(obj["spec"]["template"])
            meta = template["metadata"]
            meta["name"] = f"{obj['metadata']['name']}-{ordinal}"
            meta["labels"]["apps.kubernetes.io/pod-index"] = str(ordinal)
            meta["labels"]["statefulset.kubernetes.io/pod-name"] = meta["name"]
            for volume in template["spec"].get("volumes", []):
                if "emptyDir" in volume:
                    volume.pop("emptyDir")
                    target = secrets_dir / meta["name"] / "emptydir" / volume["name"]
                    target.mkdir(parents=True, exist_ok=True)
                    uid = template["spec"].get("securityContext", {}).get("runAsUser", 0)
                    os.chown(target, uid, 0)
                    os.chmod(target, 0o770)
                    volume["hostPath"] = {"path": str(target), "type": "Directory"}
                    continue
                if "secret" not in volume:
                    continue
                source = volume.pop("secret")
                data = secrets.get(source["secretName"])
                if data is None:
                    raise KeyError(f"Secret {source['secretName']} is not among the rendered objects")
                target = secrets_dir / meta["name"] / volume["name"]
                target.mkdir(parents=True, exist_ok=True)
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    path = target / item["path"]
                    path.write_bytes(data[item["key"]])
                    os.chmod(path, source.get("defaultMode", 0o644))
                volume["hostPath"] = {"path": str(target), "type": "Directory"}
            template["spec"]["restartPolicy"] = "Never"
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
    return out


def dump(objects: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path
