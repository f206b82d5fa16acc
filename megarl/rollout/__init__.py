"""Rollout engines (generation with per-token log-probs and routed experts) and weight sync."""
