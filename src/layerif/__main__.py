"""`python -m layerif ...` (also what torchrun launches)."""

from layerif.cli import main

main()
