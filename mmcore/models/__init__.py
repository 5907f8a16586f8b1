"""Safetensors loading and thin model definitions."""
