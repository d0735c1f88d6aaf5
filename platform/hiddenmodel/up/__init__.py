"""``hiddenmodel up``: the whole platform on one machine with no setup.

First the servers (:mod:`hiddenmodel.up.servers`): each from its ``HM_*`` setting, else a
local server on its standard port, else started embedded under ``HM_DATA_DIR``. Then the
platform itself (:mod:`hiddenmodel.up.stack`): a CPU worker, a GPU worker (the model
operations), the dispatcher and the API, each the same ``hiddenmodel`` command production
runs, with the environment ``up`` resolved. The GPU worker serves the model settled by
:mod:`hiddenmodel.up.model`: ``HM_MODEL_DIR``, or a tiny random one ``up`` makes once. A real
``resize`` job and a small ``ghost_mannequin`` job, submitted with the demo key that
:mod:`hiddenmodel.up.demo` seeds, prove the whole chain works (:mod:`hiddenmodel.up.proof`)
before :mod:`hiddenmodel.up.banner` says how to use it.

Everything ``up`` starts, embedded servers and the platform's own processes alike, is a
:class:`hiddenmodel.processes.Child` in one :class:`hiddenmodel.processes.Children` list:
started in order, stopped in reverse order on exit, Ctrl-C or SIGTERM
(:mod:`hiddenmodel.up.supervisor`), and sent its stop signal by the kernel if ``up`` itself is
killed. :mod:`hiddenmodel.up.main` runs the whole course.
"""

from hiddenmodel.up.main import run
from hiddenmodel.up.supervisor import UpError

__all__ = ["UpError", "run"]
