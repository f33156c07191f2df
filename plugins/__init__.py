"""adapterhub's built-in plugins: one module per variant, quantizer and merge method.

Each module implements the hooks of :mod:`adapterhub.registry.hookspecs` exactly as a
third-party package would.
"""
