"""slmkit: a workbench for small language models.

Heavy libraries (torch, transformers) are imported by the modules that need them, never here,
so that `slm --help` and `import slmkit` stay fast.
"""

__version__ = "0.1.0"
