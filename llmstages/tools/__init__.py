"""The `llmstages` tool commands beside fit/validate: one module each, with `HELP` and `main(argv)`."""
