"""Evaluation: run a policy over task samples (runner), compare policies (report, plots) and
measure perplexity (perplexity)."""
