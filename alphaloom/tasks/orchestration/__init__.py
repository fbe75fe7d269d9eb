"""How stages run under Prefect: content-addressed outputs, cache policy, task runners."""
