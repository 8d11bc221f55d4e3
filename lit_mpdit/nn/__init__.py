"""Magnitude-preserving building blocks (EDM2)."""
