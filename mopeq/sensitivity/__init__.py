"""Per-expert sensitivity: profile, estimators, calibration data, the quality report."""
