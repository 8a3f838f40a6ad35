"""Ray Tune sweeps: each trial is a federation on the Ray executor."""
