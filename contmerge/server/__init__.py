"""Merge server: fold checkpoints as they arrive (inbox directory and HTTP uploads)."""
