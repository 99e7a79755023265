"""DDP's ignore list: which parameters ``ddp.ignore`` names, and every spelling DDP looks them up by."""

from __future__ import annotations

import fnmatch
from typing import Any

from .diagnose import reducer_parameter_names
from .errors import ConfigError, close_matches


def match_ignore(module: Any, patterns: list[str]) -> list[str]:
    """Trainable parameters matched by ``ddp.ignore`` (a parameter name, a module name, or a glob), as reducer
    names. A tied parameter matches under any of its names."""
    names = reducer_parameter_names(module)
    known = set(names)
    canonical = {id(p): n for n, p in module.named_parameters() if n in known}
    spellings = [(n, canonical[id(p)]) for n, p in module.named_parameters(remove_duplicate=False)
                 if id(p) in canonical]  # fmt: skip
    # A framework that wraps the model in a module of its own before DDP (fastNLP's driver: `model.`) adds one
    # prefix to every name: the model's own names match too.
    firsts = {n.split(".", 1)[0] for n, _ in spellings}
    wrapped = len(firsts) == 1 and all("." in n for n, _ in spellings)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [reducer for n, reducer in spellings
                if any(c == pattern or c.startswith(pattern + ".") or fnmatch.fnmatchcase(c, pattern)
                       for c in ((n, n.split(".", 1)[1]) if wrapped else (n,)))]  # fmt: skip
        if not hits:
            modules = sorted({n.rsplit(".", k)[0] for n in names for k in range(1, n.count(".") + 1)})
            close = close_matches(pattern, names + modules, n=3)
            hint = f" Close: {', '.join(close)}." if close else ""
            raise ConfigError(f"ddp.ignore: '{pattern}' matches no trainable parameter of the model.{hint}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def ignore_spellings(module: Any, names: list[str]) -> list[str]:
    """Every name under which DDP looks a tensor up in its ignore list, for each parameter in ``names``.

    DDP (``_build_params_for_reducer``) keeps a parameter when any module that holds it does not list it
    under that module's own name, so a tied tensor must be listed under every name it has; a root-module
    parameter is looked up as ``.name`` there and as ``name`` elsewhere in DDP.
    """
    by_name = dict(module.named_parameters(remove_duplicate=False))
    wanted = {id(by_name[n]) for n in names}
    out: list[str] = []
    for module_name, mod in module.named_modules(remove_duplicate=False):
        for param_name, param in mod.named_parameters(recurse=False):
            if id(param) in wanted:
                full = f"{module_name}.{param_name}"
                out += [full] if module_name else [full, param_name]
    return list(dict.fromkeys(out))


def set_ignored(module: Any, names: list[str]) -> list[str]:
    """Tell DDP (before it wraps ``module``) to leave these parameters out of its reduction, under every name
    it may look them up by, keeping whatever the model's own code already asked DDP to ignore. Returns the
    names added."""
    from torch.nn.parallel import DistributedDataParallel

    own = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    added = [n for n in ignore_spellings(module, names) if n not in own]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, own + added)
    return added
