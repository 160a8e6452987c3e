"""Checks of rendered figures shared by the command-line tests."""

from unittest import mock

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text


def clipped_texts(fig: Figure, tolerance: float = 1.0) -> list[str]:
    """The texts a figure draws that stick out of its canvas (by more than ``tolerance`` px).

    Renders the figure with the Agg canvas (as ``savefig`` does), records every non-empty
    text actually drawn (titles, axis and tick labels, legends, colorbar labels; not the
    tick labels matplotlib skips because they lie outside the axis range) and compares its
    window extent with the figure's bounding box.
    """
    canvas = FigureCanvasAgg(fig)
    drawn = []
    draw = Text.draw

    def recording_draw(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    with mock.patch.object(Text, "draw", recording_draw):
        canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    out = []
    for text in drawn:
        box = text.get_window_extent(renderer)
        if (
            box.x0 < -tolerance
            or box.y0 < -tolerance
            or box.x1 > width + tolerance
            or box.y1 > height + tolerance
        ):
            bounds = tuple(round(float(b), 1) for b in box.bounds)
            out.append(f"{text.get_text()!r} at {bounds} outside {width:g}x{height:g}")
    return out


def record_clipping(monkeypatch) -> dict[str, list[str]]:
    """Patch :mod:`curvops.cli.plots` so that every saved figure is checked for clipped text.

    Returns:
        File name -> the clipped texts of that figure (filled as figures are saved).
    """
    from curvops.cli import plots

    found: dict[str, list[str]] = {}
    save = plots._save

    def checking_save(fig, path):
        found[path.name] = clipped_texts(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", checking_save)
    return found
