"""Gleaner segments: jobs, checkpoints, block store and VM runtime."""
