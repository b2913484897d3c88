"""Evaluation: prompt protocols (`protocols`), metrics (`metrics`), tiny evaluation-model stand-ins (`standins`).

Submodules are imported on demand: `protocols` is cheap, `metrics` pulls torchmetrics and transformers.
"""
