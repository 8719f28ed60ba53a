"""API fuzzing: schemathesis against the hub's own OpenAPI document."""
