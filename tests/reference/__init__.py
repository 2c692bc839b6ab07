"""Independent reference implementations used as test oracles (numpy, float64)."""
