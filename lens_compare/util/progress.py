"""Progress bars that suit where they are shown.

In a terminal: tqdm's text bar. In Jupyter with ipywidgets installed: a widget. In
Jupyter without ipywidgets: nothing, rather than tqdm.auto's text fallback (a wall of
bars) and its "IProgress not found" warning. In Jupyter, transformers' and
huggingface_hub's own bars (one per weight load and GGUF conversion) are silenced
either way (``quiet_library_bars``): a cell shows lens_compare's own bar, one per run.
"""

import contextlib
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


# Inside ``one_bar()``: the bars of the runs (and of the libraries' weight loads) stay hidden.
_ONE_BAR = {"active": 0}


@contextlib.contextmanager
def one_bar():
    """While it lasts, only bars made with ``progress_bar(outer=True)`` show: a sweep shows its own
    bar, not one per run and per weight load besides."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    _ONE_BAR["active"] += 1
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        _ONE_BAR["active"] -= 1
        if shown and not _ONE_BAR["active"]:
            transformers_logging.enable_progress_bar()


def progress_bar(outer: bool = False, **kwargs):
    """A tqdm bar (same arguments) for where it will be seen (see the module docstring); hidden
    inside ``one_bar()`` unless ``outer``."""
    if _ONE_BAR["active"] and not outer:
        return text_tqdm(disable=True, **kwargs)
    if in_notebook():
        _quiet_library_bars()
        if widgets_available():
            from tqdm.notebook import tqdm as widget_tqdm

            return widget_tqdm(**kwargs)
        return text_tqdm(disable=True, **kwargs)
    return text_tqdm(**kwargs)


def quiet_library_bars() -> None:
    """In Jupyter, switch off transformers' and huggingface_hub's progress bars (call it before
    loading weights); elsewhere, nothing."""
    if in_notebook():
        _quiet_library_bars()


@functools.cache
def _quiet_library_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    disable_progress_bars()


@contextlib.contextmanager
def gguf_bar_quiet_in_notebook():
    """transformers' GGUF conversion draws a ``tqdm.auto`` bar of its own, which its
    ``disable_progress_bar()`` does not reach; in Jupyter, silence that one bar while a GGUF
    loads (the module's ``tqdm`` name is swapped for a disabled one, then restored)."""
    module = None
    if in_notebook() or _ONE_BAR["active"]:
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except ImportError:
            module = None
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original
