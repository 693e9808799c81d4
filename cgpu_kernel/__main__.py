"""``python -m cgpu_kernel``: the CLI, or the kernel itself when given ``-f CONNECTION_FILE``."""

from cgpu_kernel.cli import main

if __name__ == "__main__":
    main()
