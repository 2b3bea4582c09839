"""The worker runtime must never depend on Ray or on the driver-side launcher."""

import ast
import pathlib

RUNTIME = pathlib.Path(__file__).resolve().parents[1] / "runtime"


def test_runtime_never_imports_ray_or_launcher():
    offenders = []
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("ray", "launcher"):
                    offenders.append(f"{path.relative_to(RUNTIME.parent)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)
    assert len(list(RUNTIME.rglob("*.py"))) > 10, "the check must actually see the runtime sources"
