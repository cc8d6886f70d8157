"""indextts: a pipeline library that adapts IndexTTS2 to a new language.

Each stage module (``manifest``, ``vocab``, ``speakers``, ``codec``, ``codes``, ``model``,
``checkpoint`` ...) exposes plain functions that take a config dataclass and input paths and return
output paths; ``indextts.cli`` wraps them as ``indextts <command>`` for the Snakemake rules.
"""

__version__ = "0.1.0"
