"""MLflow tracking of runs, their plots, and the UI launcher (never imported by platform)."""
