"""Example apps for batchjobs, installed as ``batchjobs.examples``."""
