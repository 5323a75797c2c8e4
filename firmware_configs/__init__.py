"""Configuration shipped with FH-AI (data only): device profiles, task definitions, broker templates,
systemd units. Read through edge_runtime.configs, which also looks in the operator's config folders."""
