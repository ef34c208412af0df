"""The repository's top-level folders (kernels/, engine/, clients/, ...) are subpackages of qwenpd, installed as
qwenpd.<folder> (setup.py). They are never top-level packages of their own.

Run from a checkout, the repository root is on `sys.path` (pytest's rootdir, `python -`, a script in the root),
and a folder would then also import under its bare name, hiding an installed distribution of that name:
Hugging Face's `kernels` package, which transformers imports, is the case that turned main red. So every
folder's `__init__.py` starts with `subpackage_only(__name__)`: imported as `qwenpd.<folder>` it does nothing;
imported bare, it hands the name to the installed distribution (found on `sys.path` without the checkout root),
or fails with an ImportError that says where the folder belongs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subpackage_only(name: str) -> None:
    """Called first by each top-level folder's `__init__.py` with its `__name__`.

    As `qwenpd.<folder>`: returns. As a bare top-level name (the checkout root on `sys.path`): loads the
    installed package of that name into `sys.modules[name]`, so the import statement that reached the folder
    binds the installed package (the import system returns `sys.modules[name]` once the module has run); with
    none installed, raises ImportError."""
    if name.startswith("qwenpd."):
        return
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _CHECKOUT]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name!r} is not a top-level package: the folder {os.path.join(_CHECKOUT, name)} is "
                          f"installed as qwenpd.{name}; import it under that name", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
