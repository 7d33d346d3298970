"""`python -m glm.serve` (and `torchrun ... -m glm.serve`)."""

from glm.serve import cli

if __name__ == "__main__":
    cli()
