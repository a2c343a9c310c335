"""Kinhbac: edge-gateway firmware and fleet manager for city-scale sensor networks."""

__version__ = "0.1.0"
