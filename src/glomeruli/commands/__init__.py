"""What users run besides `dvc repro`: the `glomeruli` command line (`cli`), predict and recalibrate
on a folder (`predict`, `recalibrate`), the pull-request review (`review`), cross-validation summaries
(`crossval`), the environment check (`doctor`) and the demo and real-data workspace (`workspace`).

Imports: any folder of the package; nothing imports `glomeruli.commands` but the command line itself.
"""
