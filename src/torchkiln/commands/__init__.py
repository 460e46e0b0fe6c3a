"""One module per `kiln` subcommand: config -> built parts -> engine. Each has `main(args) -> int`,
which `cli.py` calls; the files of a run and rank 0's duties are known here and in `rundir.py`."""
