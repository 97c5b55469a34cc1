"""Progress bars: tqdm's, imported only where a bar is drawn, so that the library runs where tqdm is
absent (a GPU machine with torch, triton and einops alone); there, and wherever a bar is off, a silent
stand-in takes the same calls."""

from __future__ import annotations

from collections.abc import Iterable


class SilentBar:
    """The part of tqdm's interface the library uses, doing nothing but iterate."""

    def __init__(self, iterable: Iterable | None = None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(message: str) -> None:
        print(message, flush=True)


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` when ``enabled`` and tqdm imports, else a :class:`SilentBar`."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return SilentBar(iterable)
        return tqdm(iterable, **kwargs)
    return SilentBar(iterable)


def write(message: str) -> None:
    """Print a line without breaking a bar that is being drawn."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        SilentBar.write(message)
    else:
        tqdm.write(message)
