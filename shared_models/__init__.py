"""What the coordinator and every hospital must agree on: tasks, models, run settings.

This package imports nothing else of fedcare and nothing of Flower's app APIs.
"""
