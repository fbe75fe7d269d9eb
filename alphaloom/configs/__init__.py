"""The YAML configs, shipped with the package as alphaloom.configs (default.yaml, smoke.yaml)."""
