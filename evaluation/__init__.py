"""Evaluation: detectors and metrics at the deployed step count (no Prefect, no MLflow here)."""
