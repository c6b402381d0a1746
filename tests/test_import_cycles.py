"""The import graph of rlhf_ray/, read from the source with `ast` (nothing is imported), has no cycle.

Every import counts, at module level or inside a function (a deferred import is still a dependency: it
only hides the circle until the call). `from a.b import c` depends on the package `a.b` (its __init__ runs)
and on the module `a.b.c` when there is one; `import a.b` on `a.b`; an imported name that is not a module
(`from a.b import SomeClass`) on the module that holds it. Importing a module also runs the packages above
it, so they count too, except the importer's own packages (a package's __init__ may import its modules).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_ray"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package is its __init__.py)."""
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of `known` that the module `name` (its `source`) imports."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}  # itself, its packages
    deps = set()
    for dotted in found:
        while dotted and dotted not in known:  # `pkg.mod.Class` -> `pkg.mod`
            dotted = dotted.rpartition(".")[0]
        while dotted:  # the module and the packages above it: their __init__ runs first
            if dotted in known and dotted not in own:
                deps.add(dotted)
            dotted = dotted.rpartition(".")[0]
    return deps


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {n: imports(n, f.read_text(), set(mods), f.name == "__init__.py") for n, f in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_relative_deferred_and_from_package_imports(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p.sub import b  # deferred\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import X\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    (pkg / "sub" / "c.py").write_text("import p.d\nX = 1\n")
    (pkg / "d.py").write_text("from p.sub.c import X\n")
    g = graph(pkg)
    assert g["p.a"] == {"p.sub", "p.sub.b"} and g["p.sub.b"] == {"p.a"} and g["p.sub"] == {"p.sub.c"}
    assert g["p.sub.c"] == {"p.d"} and g["p.d"] == {"p.sub", "p.sub.c"}
    # a -> sub.b -> a (deferred, then relative); sub -> sub.c -> d -> sub (from a package, plain, from a module)
    assert sorted(cycles(g)) == [["p.a", "p.sub.b"], ["p.d", "p.sub", "p.sub.c"]]
    (pkg / "a.py").write_text("X = 0\n")
    (pkg / "d.py").write_text("Y = 0\n")
    assert cycles(graph(pkg)) == []


def test_rlhf_ray_has_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles in rlhf_ray/ (each a set of modules that import each other):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in found)
