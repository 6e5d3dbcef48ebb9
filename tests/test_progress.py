"""Progress bars: text in a terminal, widgets in Jupyter with ipywidgets, silent in Jupyter without."""

import warnings

import pytest
from tqdm import tqdm as text_tqdm

from lens_compare.util import progress


def test_terminal_gets_a_text_bar(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    bar = progress.progress_bar(total=3, disable=None)
    assert type(bar) is text_tqdm
    bar.close()


def test_notebook_without_ipywidgets_is_quiet_and_warns_nothing(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "widgets_available", lambda: False)
    silenced = []
    monkeypatch.setattr(progress, "_quiet_library_bars", lambda: silenced.append(True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress.progress_bar(total=3, desc="base")
        bar.update(3)
        bar.close()
    assert bar.disable and silenced == [True]


def test_notebook_with_ipywidgets_gets_a_widget(monkeypatch):
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    silenced = []
    monkeypatch.setattr(progress, "_quiet_library_bars", lambda: silenced.append(True))
    from tqdm.notebook import tqdm as widget_tqdm

    bar = progress.progress_bar(total=3)
    assert isinstance(bar, widget_tqdm)
    bar.close()
    assert silenced == [True]  # transformers' loading bars would be widgets too: a wall of them


def test_library_bars_are_silenced_before_loading_in_a_notebook_only(monkeypatch):
    silenced = []
    monkeypatch.setattr(progress, "_quiet_library_bars", lambda: silenced.append(True))
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    progress.quiet_library_bars()
    assert silenced == []
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    progress.quiet_library_bars()
    assert silenced == [True]


def test_a_plain_python_process_is_not_a_notebook():
    assert progress.in_notebook() is False


def test_the_gguf_conversion_bar_is_silenced_in_a_notebook_and_restored(monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    with progress.gguf_bar_quiet_in_notebook():
        assert gguf_utils.tqdm is original
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with pytest.raises(RuntimeError), progress.gguf_bar_quiet_in_notebook():
        bar = gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
        assert bar.disable
        raise RuntimeError
    assert gguf_utils.tqdm is original
