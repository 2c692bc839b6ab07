"""The library's shape (docs/en/architecture.md): data walks forward, so no module imports one that (through
any chain) imports it back; every `import` counts, at any depth (inside functions too), and importing
`a.b.c` imports `a` and `a.b`. No module over 500 lines, no function over 80."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mindformers_dsv3"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules():
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return out


MODULES = _modules()


def _targets(module, node):
    """Every package module an import statement imports (with the packages above it)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            if not MODULES[module].endswith("__init__.py"):
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            head = ".".join(base + ([node.module] if node.module else []))
        else:
            head = node.module or ""
        names = [head] + [f"{head}.{alias.name}" for alias in node.names]
    else:
        names = [alias.name for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES)
    return found


def import_graph():
    graph = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _targets(module, node)
        parts = module.split(".")
        deps.update(".".join(parts[:i]) for i in range(1, len(parts)))  # a.b.c runs a and a.b first
        deps.discard(module)
        graph[module] = deps
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_function_sizes(module):
    with open(MODULES[module], encoding="utf-8") as fh:
        text = fh.read()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (at most {MAX_MODULE_LINES})"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"


TOOLS = ("mindformers_dsv3.planner", "mindformers_dsv3.checkpoint.cli", "mindformers_dsv3.checkpoint.__main__",
         "mindformers_dsv3.checkpoint.transform", "mindformers_dsv3.checkpoint.convert_plan",
         "mindformers_dsv3.checkpoint.convert_ranks", "mindformers_dsv3.checkpoint.streaming",
         "mindformers_dsv3.checkpoint.verify", "mindformers_dsv3.quant.cli", "mindformers_dsv3.quant.quantize",
         "mindformers_dsv3.quant.quantize_run", "mindformers_dsv3.quant.quantize_eval", "mindformers_dsv3.quant.calibrate")


def _is_tool(module):
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


def test_the_library_imports_no_tool():
    """The planner (dsv3-plan) and the converter (dsv3-convert) sit on top: no library module reaches them,
    through any chain of imports."""
    graph = import_graph()
    for module in graph:
        if _is_tool(module):
            continue
        seen, todo = set(), [module]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        tools = sorted(d for d in seen if _is_tool(d))
        assert not tools, f"{module} imports (through a chain) {tools}"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_architecture_doc_lists_every_module(lang):
    with open(os.path.join(ROOT, "docs", lang, "architecture.md"), encoding="utf-8") as fh:
        text = fh.read()
    missing = []
    for module, path in MODULES.items():
        rel = os.path.relpath(path, os.path.join(ROOT, PACKAGE)).replace(os.sep, "/")
        if rel.endswith("/__init__.py"):
            continue
        if f"`{rel}`" not in text:
            missing.append(rel)
    assert not missing, f"docs/{lang}/architecture.md lists no line for {missing}"
