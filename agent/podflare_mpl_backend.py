"""Matplotlib backend of the Podflare agent (`module://podflare_mpl_backend`).

Figures are drawn with Agg. `plt.show()` (and `fig.show()`) turns each open figure into a display
result of the running exec (a PNG under `image/png`) and closes it; the agent does the same for
figures still open when a cell ends. The agent's worker selects this backend right after
`import matplotlib` and has this directory on sys.path.

Outside the agent's worker (say, imported by a script the user runs) there is nowhere to show a
figure: `show()` then leaves figures open, like the Agg backend.
"""
from __future__ import annotations

import sys
from typing import Any

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

backend_version = '1'


def _publish(figure: Any) -> bool:
    """Hands the figure to the agent; False when not running inside its worker."""
    worker = sys.modules.get('podflare_worker')
    publish = getattr(worker, 'publish_figure', None)
    return bool(publish is not None and publish(figure))


class FigureManager(FigureManagerBase):
    def show(self) -> None:
        if _publish(self.canvas.figure):
            Gcf.destroy(self)


class FigureCanvas(FigureCanvasAgg):
    manager_class = FigureManager


def show(*args: Any, block: bool | None = None, **kwargs: Any) -> None:
    """Publishes every open figure, in figure-number order, and closes it."""
    for manager in Gcf.get_all_fig_managers():
        if _publish(manager.canvas.figure):
            Gcf.destroy(manager)
