"""Helpers the tests share: servers, data, the CLI, the agent's configuration."""
