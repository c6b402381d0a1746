"""The algorithm core must stay importable without the distributed stack (STYLE.md, principle 1)."""

import ast
import subprocess
import sys
from pathlib import Path

import rlhf_ray.algo

HEAVY = ("ray", "vllm", "deepspeed", "transformers")
ALGO_DIR = Path(rlhf_ray.algo.__file__).parent
REPO_ROOT = ALGO_DIR.parents[1]


def test_import_in_fresh_interpreter_pulls_in_no_heavy_module():
    code = (
        "import sys, rlhf_ray.algo\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_sources_import_only_torch_and_the_standard_library():
    allowed = {"torch", "math", "collections", "typing", "__future__", "rlhf_ray", "dataclasses", "importlib"}
    files = sorted(ALGO_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
                if node.module and node.module.startswith("rlhf_ray") and not node.module.startswith("rlhf_ray.algo"):
                    roots.add(f"{node.module} (outside the algo core)")
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
