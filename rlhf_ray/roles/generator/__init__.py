"""The generator role: the vLLM engine (engine.py, a plain class), its Ray shell (actor.py), the engine group
(group.py: generation over engines, healing), the engine's thread settings (threads.py) and the receiver a
tensor-parallel engine's workers take a sync with (worker_ext.py).

Import the pieces from their modules; this package import stays light (no vLLM, no Ray).
"""
