"""Shipped training configs (YAML package data)."""
