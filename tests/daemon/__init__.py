"""Tests that start keyd processes and talk to them over HTTP, the CLI or signals."""
