"""Pretraining: configuration, optimizer and schedule, distributed setup, checkpoints, the loop."""
