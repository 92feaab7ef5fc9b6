"""Script: import each named module in its own forked child of one fresh interpreter; a JSON line each.

``python tests/helpers/import_each.py [--preload NAME ...] -- MODULE ...`` imports the ``--preload``
modules (third-party ones, to keep it fast; failures ignored), checks that no module of the
packages under test is loaded yet, then forks one child per MODULE (``os.cpu_count()`` at a time):
each child starts from that state, imports its module alone and reports
``{"module", "ok", "missing", "error"}`` (``missing``: the absent module's name on
ModuleNotFoundError). A child that dies reports its exit status as the error.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

MAX_ERROR = 6000  # characters of traceback per module: the result goes through a pipe


def _child(module: str, fd: int) -> None:
    result = {"module": module, "ok": True, "missing": None, "error": None}
    try:
        importlib.import_module(module)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and the like are failures too
        result.update(ok=False, error=traceback.format_exc()[-MAX_ERROR:],
                      missing=exc.name if isinstance(exc, ModuleNotFoundError) else None)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(result))
    os._exit(0)


def import_each(modules: list, jobs: int) -> list:
    """Each module imported in a forked child; the results in the order of ``modules``."""
    pending, running, results = list(modules), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            module = pending.pop(0)
            read, write = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _child(module, write)
            os.close(write)
            running[pid] = (module, read)
        pid, status = os.wait()
        module, read = running.pop(pid)
        with os.fdopen(read) as pipe:
            text = pipe.read()
        results[module] = json.loads(text) if text else {
            "module": module, "ok": False, "missing": None,
            "error": f"the importing process died (wait status {status}) without a result"}
    return [results[m] for m in modules]


def main(argv: list) -> int:
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # the script's folder is not part of what is imported
    split = argv.index("--")
    options, modules = argv[:split], argv[split + 1:]
    preload = [name for flag, name in zip(options[::2], options[1::2]) if flag == "--preload"]
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an absent optional dependency shows in the child that needs it
            pass
    roots = {m.split(".")[0] for m in modules}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in roots)
    if loaded:
        print(json.dumps({"preloaded_package_modules": loaded}))
        return 2
    for result in import_each(modules, jobs=max(1, os.cpu_count() or 1)):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
