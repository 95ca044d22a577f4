"""`python -m llmstages ...` (and `torchrun -m llmstages fit ...`): the same entry point as the `llmstages` command."""

from llmstages.cli import main

main()
