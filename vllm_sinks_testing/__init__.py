"""Test and example helpers that are not part of the plugin: tiny seeded checkpoints built locally."""
