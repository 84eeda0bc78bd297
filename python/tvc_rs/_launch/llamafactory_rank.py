"""What every torchrun rank of ``tvc-rs train`` runs: LLaMA-Factory's rank entry point
(``llamafactory/launcher.py`` run as a script calls ``run_exp()``), with the TVC plugin installed
first. Settings come from ``$TVC_RS_LLAMAFACTORY``, set by ``tvc-rs train``."""

import os
import sys

if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0]; drop it so that nothing here shadows a package.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)

    from tvc_rs.llamafactory import install

    install()

    from llamafactory.train.tuner import run_exp

    run_exp()
