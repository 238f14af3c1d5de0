"""``python -m memdec_cli``: the memdec command, for launchers that start modules
(``torchrun -m memdec_cli ...``, ``accelerate launch -m memdec_cli ...``)."""

from memdec_cli.program import run

run()
