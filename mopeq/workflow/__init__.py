"""Orchestration of the stages for the app, the CLI and the study."""
