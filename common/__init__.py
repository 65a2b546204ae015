"""Shared code imported by the client, the server and the simulation.

Only ``common.records`` imports Flower; every other module is framework-free.
"""
