"""``--plugin MODULE``: a user's own strategy, client update or server update.

A plugin is a dotted module name or a path to a ``.py`` file whose ``@register``ed
classes become valid config names. It is imported before the config is validated; a
run directory records the plugins its run used (``plugins.json``), so ``--resume``
imports them again. On Ray, a class from a plugin travels to the workers by value (see
``actors.executor.portable_classes``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from hfedmoe.platform.errors import ConfigError

PLUGINS = "plugins.json"


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a ``.py`` path (resolved) or a dotted module name."""
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise FileNotFoundError(f"no file {path.resolve()}")
            path = path.resolve()
            # A name of its own per file, so two plugins called strategy.py do not collide.
            digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
            name = f"hfedmoe_plugin_{path.stem}_{digest}"
            if name in sys.modules:
                return sys.modules[name]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        return importlib.import_module(spec)
    except Exception as err:  # any failure of user code is the plugin's, reported as such
        raise ConfigError(
            f"--plugin {spec}: cannot import it ({type(err).__name__}: {err}); give an "
            "importable dotted module or the path of a .py file that imports cleanly"
        ) from None


def load_plugins(specs: Iterable[str]) -> list[str]:
    """Import every plugin; return them as a run directory records them (paths absolute)."""
    recorded = []
    for spec in specs:
        load_plugin(spec)
        recorded.append(str(Path(spec).expanduser().resolve()) if spec.endswith(".py") else spec)
    return recorded


def record_plugins(run_dir: Path, specs: list[str]) -> None:
    """Write the plugins a run uses into its directory (what ``--resume`` imports)."""
    if specs:
        (Path(run_dir) / PLUGINS).write_text(json.dumps(specs, indent=1))


def load_recorded_plugins(run_dir: Path) -> list[str]:
    """Import the plugins a run directory recorded (none: nothing to do)."""
    path = Path(run_dir) / PLUGINS
    return load_plugins(json.loads(path.read_text())) if path.is_file() else []
