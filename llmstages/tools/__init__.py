"""Tool commands beside `fit`/`validate`: each module has `HELP` (one line) and `main(argv)`."""
