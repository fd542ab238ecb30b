"""Deployment beyond one server process: `ray_serve` (the app as a Ray Serve deployment, N replicas with
session affinity) and `affinity` (the routing key of a request, and the Ray Serve proxy middleware that
sets it). Nothing is imported here: `ray` is an optional dependency (`pip install -r requirements-ray.txt`).
"""
