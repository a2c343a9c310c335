"""A static check of the firmware against the ESP32 port's API (esp32_api.json).

The emulated boards run the firmware on the unix port with stand-in modules, which can accept
things a real ESP32 refuses. This reads the firmware with Python's `ast` and, for every use of
a port module it can follow, checks that the name exists on the port and that a call passes
positional and keyword arguments the port's C (or asyncio's Python) accepts:

- modules: `import machine`, `import machine as m`, `from machine import Pin`;
- classes and the objects they make: `machine.Pin(4)`, `p = Pin(4); p.irq(...)`,
  `self.pin = Pin(4)` in any method of a class, then `self.pin.irq(...)` in another;
- what a few functions return (asyncio.open_connection's streams, asyncio.create_task's task,
  select.poll's poll object);
- a parameter of one of the firmware's own module-level functions, when every call of it in
  the firmware passes the same kind of port object (`wifi_up(self.wlan, ...)`).

It does not guess: a name it cannot type (a parameter, a value from a dict) is not checked.
Code under `if hasattr(x, "name"):` (or a flag set from such a test) may use `name`: it only
runs where it exists. A module the firmware imports that is neither one of its own nor in the
table is reported, so using a new port module means extending the table.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinhbac.emulator import esp32_api

# What some Python-level functions return (their `return` is Python code the table does not
# evaluate): asyncio's streams, tasks and loops.
RETURNS: dict[str, Any] = {
    "asyncio.open_connection": ("asyncio.StreamReader", "asyncio.StreamWriter"),
    "asyncio.create_task": "asyncio.Task",
    "asyncio.current_task": "asyncio.Task",
    "asyncio.get_event_loop": "asyncio.Loop",
    "asyncio.new_event_loop": "asyncio.Loop",
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    name: str  # e.g. machine.Pin.irq
    problem: str
    error: str  # what the port raises, with its source line

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}: {self.problem}" + (
            f" [on the port: {self.error}]" if self.error else "")


# ----- what an expression is -----

@dataclass(frozen=True)
class Module:
    name: str


@dataclass(frozen=True)
class Member:
    """A name the port defines: a function, class, constant or exception."""

    qualname: str
    entry: Any


@dataclass(frozen=True)
class Instance:
    """An object of a port class."""

    qualname: str
    entry: Any


@dataclass(frozen=True)
class Bound:
    """A method of a port object."""

    qualname: str
    entry: Any


@dataclass(frozen=True)
class Several:
    """A tuple of values (what `a, b = ...` unpacks)."""

    items: tuple


@dataclass(frozen=True)
class Own:
    """One of the firmware's own module-level functions."""

    qualname: str


def _is_hasattr(test: ast.expr) -> str | None:
    """The attribute name a `hasattr(x, "name")` test asks about, or None."""
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name)
            and test.func.id == "hasattr" and len(test.args) == 2
            and isinstance(test.args[1], ast.Constant) and isinstance(test.args[1].value, str)):
        return test.args[1].value
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    names = [t] if not isinstance(t, ast.Tuple) else list(t.elts)
    return any(isinstance(n, ast.Name) and n.id == "ImportError" for n in names)


class Checker:
    def __init__(self, project_modules: set[str]):
        self.table = esp32_api.load()
        self.project = project_modules
        self.violations: list[Violation] = []
        self.quiet = False
        self.path = ""
        self.module = ""
        # Own functions: qualname -> the argument types seen at each call (first pass).
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.param_types: dict[str, dict[str, Any]] = {}
        self._reported: set[tuple] = set()
        self._guards: dict[str, str] = {}  # flag name -> attribute its hasattr() tested
        self._guarded: dict[int, str] = {}  # id(node) -> attribute it may use

    # -- reporting --

    def report(self, node: ast.AST, name: str, problem: str, error: dict | None = None):
        if self.quiet:
            return
        line = getattr(node, "lineno", 0)
        key = (self.path, line, name, problem)
        if key in self._reported:
            return
        self._reported.add(key)
        text = f"{error['type']}: {error['message']} ({error['src']})" if error else ""
        self.violations.append(Violation(self.path, line, name, problem, text))

    def _later(self, qualname: str) -> str:
        for tag, info in self.table.get("compared_with", {}).items():
            if qualname in info.get("only_there", []):
                return f" ({tag} has it)"
        return ""

    # -- files --

    def check_tree(self, tree: ast.Module, label: str, module: str):
        self.path = label
        self.module = module
        self._mark(tree)
        scope: dict[str, Any] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scope[node.name] = Own(f"{module}.{node.name}")
        self._imports(tree, scope)
        self._block(tree.body, scope, None, top=True)

    def _mark(self, tree: ast.Module):
        """Optional imports, and code guarded by a hasattr() test."""
        self._guards = {}
        self._guarded = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and _is_hasattr(node.value):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self._guards[t.id] = _is_hasattr(node.value)
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                for sub in node.body:
                    for inner in ast.walk(sub):
                        inner._optional = True  # type: ignore[attr-defined]
            if isinstance(node, ast.If):
                attr = _is_hasattr(node.test)
                if attr is None and isinstance(node.test, ast.Name):
                    attr = self._guards.get(node.test.id)
                if attr is not None:
                    for sub in node.body:
                        for inner in ast.walk(sub):
                            self._guarded[id(inner)] = attr

    def _imports(self, tree: ast.Module, scope: dict):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if self._is_port(alias.name, node):
                        scope[alias.asname or alias.name.split(".")[0]] = Module(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in self.project:
                    for alias in node.names:
                        scope[alias.asname or alias.name] = Own(f"{node.module}.{alias.name}")
                    continue
                if not self._is_port(node.module, node):
                    continue
                for alias in node.names:
                    qual = f"{node.module}.{alias.name}"
                    entry = esp32_api.lookup(qual)
                    if entry is None:
                        self.report(node, qual, f"the port's {node.module} has no "
                                                f"{alias.name!r}{self._later(qual)}")
                        continue
                    scope[alias.asname or alias.name] = Member(qual, entry)

    def _is_port(self, module: str, node: ast.AST) -> bool:
        if module.split(".")[0] in self.project:
            return False
        if module in self.table["modules"]:
            return True
        if not getattr(node, "_optional", False):
            self.report(node, module, "not one of the firmware's modules and not in the ESP32 "
                                      "API table (extend kinhbac/emulator/esp32_api if the "
                                      "port has it)")
        return False

    # -- statements --

    def _block(self, body: list[ast.stmt], scope: dict, cls_attrs: dict | None,
               top: bool = False):
        for node in body:
            self._stmt(node, scope, cls_attrs, top)

    def _stmt(self, node: ast.stmt, scope: dict, cls_attrs: dict | None, top: bool = False):
        if isinstance(node, ast.ClassDef):
            attrs = self._class_attrs(node, scope)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self._function(item, scope, attrs, None)
                else:
                    self._stmt(item, scope, attrs)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            own = f"{self.module}.{node.name}" if top else None
            self._function(node, scope, cls_attrs, own)
            return
        if isinstance(node, ast.Assign):
            value = self._type(node.value, scope, cls_attrs)
            for target in node.targets:
                self._target(target, scope, cls_attrs)
                self._bind(target, value, scope)
            return
        if isinstance(node, ast.AnnAssign):
            value = self._type(node.value, scope, cls_attrs) if node.value else None
            self._bind(node.target, value, scope)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._type(child, scope, cls_attrs)
            elif isinstance(child, ast.withitem):
                self._type(child.context_expr, scope, cls_attrs)
            elif isinstance(child, ast.ExceptHandler):
                if child.type is not None:
                    self._type(child.type, scope, cls_attrs)
                self._block(child.body, scope, cls_attrs)
            elif isinstance(child, ast.stmt):
                self._stmt(child, scope, cls_attrs)

    def _target(self, target: ast.expr, scope: dict, cls_attrs: dict | None):
        # `x.attr = ...` and `x[i] = ...` read x; a plain name is only bound.
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            self._type(target.value, scope, cls_attrs)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._target(elt, scope, cls_attrs)

    def _function(self, fn, outer: dict, cls_attrs: dict | None, own: str | None):
        for default in fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]:
            self._type(default, outer, cls_attrs)
        for deco in fn.decorator_list:
            self._type(deco, outer, cls_attrs)
        scope = dict(outer)
        params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        for arg in params:
            scope.pop(arg.arg, None)  # a parameter hides a module-level name
        for name, t in self.param_types.get(own or "", {}).items():
            scope[name] = t
        self._block(fn.body, scope, cls_attrs)

    def _class_attrs(self, cls: ast.ClassDef, scope: dict) -> dict:
        """self.<name> -> type, from `self.x = <typed>` anywhere in the class's methods."""
        found: dict[str, Any] = {}
        conflicts: set[str] = set()
        was_quiet, self.quiet = self.quiet, True
        try:
            for node in ast.walk(cls):
                if not isinstance(node, ast.Assign) or id(node) in self._guarded:
                    continue
                for target in node.targets:
                    if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                            and target.value.id == "self"):
                        continue
                    if isinstance(node.value, ast.Constant) and node.value.value is None:
                        continue  # "not yet": says nothing about the type
                    t = self._type(node.value, scope, None)
                    if target.attr in found and found[target.attr] != t:
                        conflicts.add(target.attr)
                    found[target.attr] = t
        finally:
            self.quiet = was_quiet
        return {k: v for k, v in found.items() if k not in conflicts and v is not None}

    def _bind(self, target: ast.expr, value, scope: dict):
        if isinstance(target, ast.Name):
            if value is not None:
                scope[target.id] = value
            else:
                scope.pop(target.id, None)
        elif isinstance(target, (ast.Tuple, ast.List)):
            items = value.items if isinstance(value, Several) else ()
            for k, elt in enumerate(target.elts):
                self._bind(elt, items[k] if k < len(items) else None, scope)

    # -- expressions --

    def _type(self, node: ast.expr | None, scope: dict, cls_attrs: dict | None):
        """The type of an expression (None if unknown); reports misuse on the way."""
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Attribute):
            if (isinstance(node.value, ast.Name) and node.value.id == "self"
                    and cls_attrs is not None):
                return cls_attrs.get(node.attr)
            base = self._type(node.value, scope, cls_attrs)
            return self._attribute(node, base)
        if isinstance(node, ast.Call):
            func = self._type(node.func, scope, cls_attrs)
            args = [self._type(a.value if isinstance(a, ast.Starred) else a, scope, cls_attrs)
                    for a in node.args]
            kwargs = {kw.arg: self._type(kw.value, scope, cls_attrs) for kw in node.keywords}
            return self._call(node, func, args, kwargs)
        if isinstance(node, ast.Await):
            return self._type(node.value, scope, cls_attrs)
        if isinstance(node, ast.Tuple):
            return Several(tuple(self._type(e, scope, cls_attrs) for e in node.elts))
        if isinstance(node, (ast.Lambda,)):
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._type(child, scope, cls_attrs)
            elif isinstance(child, ast.comprehension):
                self._type(child.iter, scope, cls_attrs)
                for cond in child.ifs:
                    self._type(cond, scope, cls_attrs)
        return None

    def _attribute(self, node: ast.Attribute, base):
        if isinstance(base, Module):
            qual = f"{base.name}.{node.attr}"
            entry = esp32_api.lookup(qual)
            if entry is None:
                self._missing(node, qual, f"the port's {base.name} module has no {node.attr!r}")
                return None
            return Member(qual, entry)
        if isinstance(base, Member) and base.entry["kind"] in ("class", "exception"):
            return self._member(node, base.qualname, base.entry, Member)
        if isinstance(base, Instance):
            return self._member(node, base.qualname, base.entry, Bound)
        return None

    def _missing(self, node: ast.AST, qual: str, problem: str):
        if self._guarded.get(id(node)) == qual.rsplit(".", 1)[-1]:
            return  # under `if hasattr(..., name)`: runs only where it exists
        self.report(node, qual, problem + self._later(qual))

    def _member(self, node: ast.Attribute, qualname: str, entry: dict, kind):
        members = entry.get("members")
        qual = f"{qualname}.{node.attr}"
        if members is None:
            self.report(node, qual, "the table does not list this class's members: extend it")
            return None
        found = members.get(node.attr)
        if found is None:
            self._missing(node, qual, f"{qualname.split('.')[-1]} has no {node.attr!r} on the "
                                      f"port")
            return None
        if kind is Bound and found["kind"] != "function":
            return Member(qual, found)
        return kind(qual, found)

    def _call(self, node: ast.Call, func, args: list, kwargs: dict):
        if isinstance(func, Own):
            self._record(node, func.qualname, args, kwargs)
            return None
        if isinstance(func, (Member, Bound)):
            entry = func.entry
            name = func.qualname
            if entry["kind"] == "function":
                sig = entry.get("sig")
                result = self._returns(func.qualname, entry)
            elif entry["kind"] in ("class", "exception"):
                sig = entry.get("call")
                result = Instance(func.qualname, entry)
                if sig is None and entry.get("not_callable"):
                    self.report(node, name, "cannot be called on the port")
                    return None
            else:
                self.report(node, name, f"is a {entry['kind']}, not something to call")
                return None
        elif isinstance(func, Instance):
            sig = func.entry.get("instance_call")
            name = func.qualname + "()"
            result = None
            if sig is None:
                self.report(node, name, "its objects cannot be called on the port")
                return None
        else:
            return None
        if sig is None:
            self.report(node, name, "no signature in the table for it: extend it "
                                    "(kinhbac/emulator/esp32_api)")
            return result
        problem = esp32_api.call_problem(
            sig, sum(1 for a in node.args if not isinstance(a, ast.Starred)),
            [k.arg for k in node.keywords if k.arg is not None],
            star_args=any(isinstance(a, ast.Starred) for a in node.args),
            star_kwargs=any(k.arg is None for k in node.keywords))
        if problem:
            reason, which = problem
            self.report(node, name, f"{reason}; the port takes {esp32_api.describe(sig)} "
                                    f"({sig.get('src')})", esp32_api.error(sig, which))
        return result

    def _record(self, node: ast.Call, qualname: str, args: list, kwargs: dict):
        if any(isinstance(a, ast.Starred) for a in node.args) or None in kwargs:
            self.calls.setdefault(qualname, []).append({"*": None})
            return
        seen = {str(k): t for k, t in enumerate(args)}
        seen.update(kwargs)
        self.calls.setdefault(qualname, []).append(seen)

    def _returns(self, qualname: str, entry: dict):
        if isinstance(entry.get("returns"), dict):
            return Instance(qualname + "()", entry["returns"])
        spec = RETURNS.get(qualname)
        if spec is None:
            return None
        names = spec if isinstance(spec, tuple) else (spec,)
        items = []
        for name in names:
            cls = esp32_api.lookup(name)
            items.append(Instance(name, cls) if cls else None)
        return Several(tuple(items)) if isinstance(spec, tuple) else items[0]


def _infer_params(trees: dict[str, tuple[str, ast.Module]], calls: dict) -> dict:
    """Parameters of the firmware's own functions that every call passes the same port
    object for."""
    out: dict[str, dict[str, Any]] = {}
    for module, (_, tree) in trees.items():
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            qual = f"{module}.{node.name}"
            sites = calls.get(qual)
            if not sites or any("*" in s for s in sites):
                continue
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            typed = {}
            for k, name in enumerate(params):
                kinds = [s.get(str(k), s.get(name)) for s in sites]
                if kinds and all(t is not None and t == kinds[0] for t in kinds):
                    if isinstance(kinds[0], (Instance, Module)):
                        typed[name] = kinds[0]
            if typed:
                out[qual] = typed
    return out


def module_name(path: Path, root: Path) -> str:
    rel = path.resolve().relative_to(root.resolve()).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path, extra: tuple[str, ...] = ("wire",)) -> set[str]:
    """Top-level names the firmware imports from itself: its packages and modules, and
    `wire` (kinhbac/wire.py, /lib/wire.py on a board)."""
    names = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir()}
    return names | set(extra)


def check_files(files: dict[str, tuple[str, str]], project: set[str]) -> list[Violation]:
    """Violations in {module name: (label, source)}; two passes so that calls of the
    firmware's own functions can type their parameters."""
    trees = {module: (label, ast.parse(source, label))
             for module, (label, source) in files.items()}
    checker = Checker(project)
    checker.quiet = True
    for module, (label, tree) in trees.items():
        checker.check_tree(tree, label, module)
    checker.param_types = _infer_params(trees, checker.calls)
    checker.quiet = False
    for module, (label, tree) in trees.items():
        checker.check_tree(tree, label, module)
    return checker.violations


def check_paths(paths: list[Path], root: Path, project: set[str],
                extra: dict[str, Path] | None = None,
                label_root: Path | None = None) -> list[Violation]:
    """Violations in the firmware files under `root`, and in `extra` ({module name: path},
    e.g. {"wire": kinhbac/wire.py}); paths are reported relative to `label_root`."""
    base = (label_root or Path.cwd()).resolve()
    files = {}
    for path in paths:
        files[module_name(path, root)] = (_label(path, base), path.read_text())
    for module, path in (extra or {}).items():
        files[module] = (_label(path, base), path.read_text())
    return check_files(files, project)


def _label(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path)


def check_source(source: str, project: set[str] | None = None) -> list[Violation]:
    """Violations in one piece of firmware source (for tests)."""
    return check_files({"snippet": ("<snippet>", source)}, project or set())
