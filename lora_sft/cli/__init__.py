"""The command line: `cli.main` parses argv and hands each command to its handler (`commands` for a finished run,
`scaffold` for `init`, `preview`); mistakes are one `error:` line and exit 2."""
