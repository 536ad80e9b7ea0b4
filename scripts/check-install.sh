#!/usr/bin/env bash
# Does the README's set-up depend on anything left on this machine? Resolves exactly what
# scripts/prepare-env.sh installs (this package with its extras, under constraints.txt) against the package
# registries as a new machine would: ignoring what is installed, without pip's cache, downloading only
# metadata (about 20 s). Fails when a pin is not served (a `name @ file:///...` that exists only here, a
# yanked or mistyped version) or when the resolved set holds a package constraints.txt does not pin.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
report=$(mktemp)
trap 'rm -f "$report"' EXIT
# This machine's pip config names local indexes that may be absent; pip's warning about them is noise here.
PIP_NO_CACHE_DIR=1 pip install --dry-run --ignore-installed --quiet --report "$report" \
  -c constraints.txt ".[test,ray]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
python - "$report" <<'PY'
import json, re, sys
pins = {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", open("constraints.txt").read(), re.M)}
unpinned = []
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name != "llama-stack-trl-fsdp" and name not in pins:
        unpinned.append(f"{name}=={item['metadata']['version']}")
if unpinned:
    sys.exit("resolved but not pinned in constraints.txt (run scripts/freeze-constraints.sh): " + ", ".join(unpinned))
print(f"install check: the README's set-up resolves from the registries alone ({len(pins)} pins, no cache)")
PY
