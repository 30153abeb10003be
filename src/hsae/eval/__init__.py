"""Metrics as functions of tensors: the CLI, the trainer's logs, reports and the browser all call these."""
