"""``python -m dino_fast.export``: the command lives in :mod:`dino_fast.export.command`."""
from dino_fast.export.command import main

if __name__ == "__main__":
    main()
