"""`python -m providers.validation CONFIG.json`: run validate_model(**config) (the service runs each
validation in its own process, so its peak memory is the validation's own)."""

import json
import sys

from .report import validate_model

if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    report = validate_model(**config)
    print(json.dumps({"passed": report["passed"], "out_dir": config["out_dir"]}))
