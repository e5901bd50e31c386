"""Developer scripts (not shipped in the package): BUILD and config-reference generators."""
