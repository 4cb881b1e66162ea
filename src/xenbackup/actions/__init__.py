"""Actions: what the CLI verbs and unit steps do, built from the adapters."""
