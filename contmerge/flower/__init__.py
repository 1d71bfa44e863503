"""Flower integration: any contmerge strategy as a Flower strategy."""
