#!/usr/bin/env bash
# Write constraints.txt from the environment the suite passed in (.venv): only `name==version` pins that a
# package registry serves. `pip freeze` writes `name @ file:///...` for a wheel installed from a local file,
# a pin that installs nowhere else; this script writes every package as name==version instead, drops
# local version labels (torch 2.13.0+cpu -> torch==2.13.0: the same pin picks the CPU or CUDA build a
# machine's index offers) and refuses editable or VCS installs other than this project.
# Pins of packages that are not installed here (an extra that installs only elsewhere) are kept.
# Usage: ./scripts/freeze-constraints.sh   (then run tests/test_constraints.py and commit the file)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python - <<'PY'
import json
import re
import subprocess
import sys
from importlib import metadata

project = "llama-stack-trl-fsdp"
pins, refused = {}, []
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if not name or name.lower() in (project, "pip"):  # pip: the venv's own, upgraded by prepare-env
        continue
    direct = dist.read_text("direct_url.json")
    if direct:
        info = json.loads(direct)
        # a local wheel file is fine (pinned by version below); editable trees and VCS checkouts are not
        if info.get("dir_info", {}).get("editable") or "vcs_info" in info:
            refused.append(f"{name}: installed from {info.get('url')}")
            continue
    version = re.sub(r"\+.*$", "", dist.version)
    pins[re.sub(r"[-_.]+", "-", name).lower()] = f"{name}=={version}"
# Pins of packages not installed here (extras such as `gpu` that only install on other machines) are kept.
try:
    for line in open("constraints.txt"):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+$", line.strip())
        key = m and re.sub(r"[-_.]+", "-", m.group(1)).lower()
        if key and key not in pins:
            pins[key] = line.strip()
            print(f"kept (not installed here): {line.strip()}")
except FileNotFoundError:
    pass
if refused:
    sys.exit("not from a registry, install them from one first:\n  " + "\n  ".join(refused))
text = "\n".join(pins[k] for k in sorted(pins)) + "\n"
open("constraints.txt", "w").write(text)
print(f"constraints.txt: {len(pins)} pins")
PY
