"""``python -m adapterhub ...`` runs the CLI (so ``torchrun --nproc_per_node 2 -m adapterhub train ...`` works)."""

from .cli import main

if __name__ == "__main__":
    main()
