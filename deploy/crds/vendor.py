"""Vendor the `v1` OpenAPI schemas of KubeRay's RayJob and RayService CRDs (what tests/test_deploy.py validates the
manifests in deploy/ against).

    git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python deploy/crds/vendor.py /tmp/kuberay/ray-operator/config/crd/bases --release v1.7.0 \
        --commit "$(git -C /tmp/kuberay rev-parse HEAD)"

Each CRD file (ray.io_rayjobs.yaml, ray.io_rayservices.yaml; ~1 MB each, also holding the older v1alpha1 version)
becomes one JSON file here: `spec.versions[name == v1].schema.openAPIV3Schema`, unchanged, beside the CRD's group,
kind and version and the source's release, commit, path and SHA-256. KubeRay generates its CRDs without field
descriptions, so nothing is dropped but the other versions and YAML's indentation. Update deploy/crds/README.md with
the release and commit afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE_DIR = "ray-operator/config/crd/bases"
CRDS = {"ray.io_rayjobs.yaml": "rayjob.v1.schema.json", "ray.io_rayservices.yaml": "rayservice.v1.schema.json"}


def extract(crd_path: Path, release: str, commit: str, version: str = "v1") -> dict:
    """The vendored record of one CRD file: provenance, group/kind/version and the version's openAPIV3Schema."""
    raw = crd_path.read_bytes()
    crd = yaml.safe_load(raw)
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        raise ValueError(
            f"{crd_path} has no version {version!r} (found {[v['name'] for v in crd['spec']['versions']]})"
        )
    return {
        "source": {
            "repository": "https://github.com/ray-project/kuberay",
            "release": release,
            "commit": commit,
            "path": f"{SOURCE_DIR}/{crd_path.name}",
            "sha256": hashlib.sha256(raw).hexdigest(),
            "license": "Apache-2.0",
        },
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": version,
        "openAPIV3Schema": served[0]["schema"]["openAPIV3Schema"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd_dir", type=Path, help=f"a KubeRay checkout's {SOURCE_DIR}")
    parser.add_argument("--release", required=True, help="the KubeRay release tag, e.g. v1.7.0")
    parser.add_argument("--commit", required=True, help="the commit of that tag (40 hex digits)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for source, target in CRDS.items():
        record = extract(args.crd_dir / source, args.release, args.commit)
        # one JSON token per line: diffs between releases stay readable, ~240 KB per file
        text = json.dumps(record, indent=0, separators=(",", ":")) + "\n"
        (args.out / target).write_text(text)
        print(
            f"{args.out / target}: {record['kind']} {record['version']} from {args.release} ({len(text) // 1024} KiB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
