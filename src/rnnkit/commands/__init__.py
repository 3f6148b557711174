"""The subcommands that use a trained run: ``predict``, ``evaluate``, ``sample``, ``transcribe``.

Each module has ``add_parser(commands, threads_help)`` and ``run(args) -> exit code``; all of them
go through :func:`rnnkit.load`, so every task is served by the same machinery.
"""
