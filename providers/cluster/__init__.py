"""What the machines jobs run on are: the node registry (nodes.py), below the launchers and the service."""
