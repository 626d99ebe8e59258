"""Plumbing every other folder may use: the params loader and its validation (`params`), atomic writes
(`atomic`), the process pool of the data stages (`parallel`), logging (`logs`), the user-error base class
(`errors`), output paths (`paths`), the stage wrapper (`stagekit`), the stage-dependency walk (`stage_deps`),
spreadsheet-safe CSV cells (`csvcells`) and the git/dvc subprocess helpers (`vcs`).

Imports: the standard library and third-party packages only; nothing from `glomeruli.data`, `.model`,
`.evaluation` or `.commands`.
"""
