"""Merge rules, one file each. Find them by name with ``contmerge.registry``."""
