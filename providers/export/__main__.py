"""`python -m providers.export CONFIG.json`: run export_model(**config) in its own process."""

import json
import os
import sys

from .exporter import export_model

if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    hub = config.get("hub") or {}
    if hub.get("token_env"):  # the token stays in the environment, never in a file
        hub["token"] = os.environ.get(hub.pop("token_env"))
    config["hub"] = hub
    summary = export_model(**config)
    print(json.dumps({"out_dir": config["out_dir"], "formats": summary["formats"]}))
