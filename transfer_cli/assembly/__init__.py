"""The one reader of the config: builders per config group that turn it into the objects a run is made of.

Library code (data/, models/, training/, ...) takes plain values, or for a group's own concept that group's
record from config/schema.py, and never sees OmegaConf; everything that reads a composed config lives here.
"""
