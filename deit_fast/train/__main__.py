"""python -m deit_fast.train ...: the same as deit-fast train ... (torchrun-friendly)."""
from .run import main

main()
