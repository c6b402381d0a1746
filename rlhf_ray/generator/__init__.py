"""The generator role: vLLM engines as Ray actors (engine.py, actor.py, group.py) and their records.

Import the pieces from their modules; this package import stays light (no vLLM, no Ray).
"""
