"""Conversions between our Meta-format models and other formats."""
