"""`python -m providers.export CONFIG.json`: run export_model(**config) in its own process."""

import json
import os
import sys

from .exporter import export_model

if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    hub = config.get("hub") or {}
    # The variable is the operator's (outbound.hub.token_env), put here by the service; the token itself
    # stays in the environment, never in a file.
    token_env = hub.pop("token_env", None)
    if token_env:
        hub["token"] = os.environ.get(token_env) or None
    config["hub"] = hub
    summary = export_model(**config)
    print(json.dumps({"out_dir": config["out_dir"], "formats": summary["formats"]}))
