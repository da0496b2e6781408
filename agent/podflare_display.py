"""Rich display of values, as in IPython: MIME bundles from `_repr_*_` methods, matplotlib figures
as PNG, and the import hook that selects the agent's matplotlib backend."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
import types
from typing import Any

MPL_BACKEND = 'module://podflare_mpl_backend'
SIMPLE_TYPES = (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)


def figure_bundle(figure: Any) -> dict:
    bundle = {'text/plain': repr(figure)}
    if figure.axes or figure.lines:  # an empty figure would be a blank image
        buf = io.BytesIO()
        figure.savefig(buf, format='png', bbox_inches='tight')
        bundle['image/png'] = base64.b64encode(buf.getvalue()).decode('ascii')
    return bundle


def is_figure(obj: Any) -> bool:
    module = sys.modules.get('matplotlib.figure')
    return module is not None and isinstance(obj, module.Figure)


#: Rich display methods (IPython's protocol) and the MIME type each produces.
REPR_METHODS = (
    ('_repr_html_', 'text/html'),
    ('_repr_markdown_', 'text/markdown'),
    ('_repr_svg_', 'image/svg+xml'),
    ('_repr_png_', 'image/png'),
    ('_repr_jpeg_', 'image/jpeg'),
    ('_repr_json_', 'application/json'),
    ('_repr_latex_', 'text/latex'),
)


def mime_value(mime: str, value: Any) -> Any:
    """A repr method's result as a JSON-able bundle value, or None to leave it out."""
    if isinstance(value, tuple) and len(value) == 2:  # (data, metadata)
        value = value[0]
    if value is None:
        return None
    textual = mime.startswith('text/') or mime == 'image/svg+xml' or mime.endswith('json')
    if isinstance(value, (bytes, bytearray)):  # binary formats travel base64-encoded
        return bytes(value).decode('utf-8', 'replace') if textual else base64.b64encode(value).decode('ascii')
    if isinstance(value, str):
        return value
    if mime.endswith('json'):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
        return value
    return None


def mime_bundle(obj: Any) -> dict:
    """text/plain always (a failing __repr__ is the user's error and propagates), plus whatever
    rich representations the object offers without raising."""
    bundle: dict[str, Any] = {'text/plain': repr(obj)}
    if type(obj) in SIMPLE_TYPES or isinstance(obj, type):
        return bundle
    if is_figure(obj):
        bundle.update(figure_bundle(obj))
        return bundle
    for attr, mime in REPR_METHODS:
        try:
            method = getattr(obj, attr, None)
            value = mime_value(mime, method()) if callable(method) else None
        except Exception:
            continue
        if value is not None:
            bundle[mime] = value
    try:  # _repr_mimebundle_ wins over the individual methods, as in IPython
        method = getattr(obj, '_repr_mimebundle_', None)
        extra = method(include=None, exclude=None) if callable(method) else None
        if isinstance(extra, tuple) and len(extra) == 2:
            extra = extra[0]
        if isinstance(extra, dict):
            for mime, value in extra.items():
                value = mime_value(mime, value) if isinstance(mime, str) else None
                if value is not None:
                    bundle[mime] = value
    except Exception:
        pass
    return bundle


class MatplotlibHook:
    """One-shot import hook: right after `import matplotlib`, select podflare_mpl_backend.

    Setting rcParams here instead of MPLBACKEND in the environment keeps the variable out of
    every process the user starts (a child Python could not import the backend and would fail).
    An explicit MPLBACKEND still wins."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != 'matplotlib':
            return None
        try:
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = getattr(spec, 'loader', None)
            real_exec = getattr(loader, 'exec_module', None)
        except Exception:
            return None
        if real_exec is None:
            return spec

        def exec_module(module: types.ModuleType) -> None:
            real_exec(module)
            if not os.environ.get('MPLBACKEND'):
                try:
                    module.rcParams['backend'] = MPL_BACKEND
                except Exception:
                    pass
        loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec
