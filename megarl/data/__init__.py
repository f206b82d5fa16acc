"""Prompt datasets, chat templates, rewards and synthetic verifiable tasks."""
