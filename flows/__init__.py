"""Thin Prefect flows over the segpipe library (no numerics here)."""
