"""Entry point of ``python -m dropblock_jax.demo``."""

from dropblock_jax.demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
