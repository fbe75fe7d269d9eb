"""The registered model: logging, the champion alias, scoring the latest date."""
