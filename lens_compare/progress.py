"""Progress bars that suit where they are shown.

In a terminal: tqdm's text bar. In Jupyter with ipywidgets installed: a widget. In
Jupyter without ipywidgets: nothing, rather than tqdm.auto's text fallback (a wall of
bars) and its "IProgress not found" warning; transformers' and huggingface_hub's own
bars are silenced there too.
"""

import functools
import importlib.util

from tqdm import tqdm as text_tqdm


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def widgets_available() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(**kwargs):
    """A tqdm bar (same arguments) for where it will be seen (see the module docstring)."""
    if in_notebook():
        if widgets_available():
            from tqdm.notebook import tqdm as widget_tqdm

            return widget_tqdm(**kwargs)
        _quiet_library_bars()
        return text_tqdm(disable=True, **kwargs)
    return text_tqdm(**kwargs)


@functools.cache
def _quiet_library_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    disable_progress_bars()
