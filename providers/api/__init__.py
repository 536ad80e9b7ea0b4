"""The post-training API: request models (requests.py), path and name checks (paths.py), request -> JobSpec (to_spec.py)."""
