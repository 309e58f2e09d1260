"""The engine stays WebUI-free and the extension adds no dependencies to the WebUI."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBUI_PACKAGES = {"modules", "launch", "webui", "ldm", "sgm", "scripts"}
SHIPPED_BY_WEBUI = {"torch", "numpy", "einops", "k_diffusion", "safetensors", "gradio",
                    "psutil"}  # psutil: WebUI v1.10.1 requirements_versions.txt pins 5.9.5; imported guarded


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


ADAPTER_DIRS = {"webui"}  # lib_hires/webui: the adapters (AUTOMATIC1111; Forge in lib_hires/webui/forge)
FORGE_PACKAGES = {"backend", "modules_forge"}


def engine_files():
    return [p for p in (ROOT / "lib_hires").rglob("*.py")
            if not ADAPTER_DIRS & set(p.relative_to(ROOT / "lib_hires").parts)]


def test_engine_imports_nothing_from_the_webui():
    files = engine_files()
    assert files
    for path in files:
        assert not imported_roots(path) & WEBUI_PACKAGES, path


def test_engine_needs_only_what_the_webui_ships():
    import sys
    stdlib = set(sys.stdlib_module_names)
    for path in engine_files():
        third_party = imported_roots(path) - stdlib - {"lib_hires"}
        assert third_party <= SHIPPED_BY_WEBUI, (path, third_party - SHIPPED_BY_WEBUI)


def test_install_script_installs_nothing():
    tree = ast.parse((ROOT / "install.py").read_text())
    calls = {getattr(n.func, "attr", getattr(n.func, "id", "")) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"run_pip", "run", "check_call", "system", "Popen"}
    assert "launch" not in imported_roots(ROOT / "install.py")


def test_webui_adapters_need_only_what_the_webui_ships():
    import sys
    stdlib = set(sys.stdlib_module_names)
    adapters = list((ROOT / "lib_hires" / "webui").rglob("*.py")) + list((ROOT / "scripts").rglob("*.py"))
    assert adapters
    for path in adapters:
        third_party = imported_roots(path) - stdlib - {"lib_hires"}
        forge = FORGE_PACKAGES if "forge" in path.relative_to(ROOT).parts else set()  # Forge ships its own
        assert third_party <= SHIPPED_BY_WEBUI | {"fastapi", "PIL", "psutil", "modules"} | forge, (path, third_party)


def test_forge_adapters_import_forge_inside_functions_only():
    """So they import (and are tested with fakes) without Forge."""
    files = list((ROOT / "lib_hires" / "webui" / "forge").rglob("*.py"))
    assert files
    for path in files:
        top_level = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                top_level.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top_level.add(node.module.split(".")[0])
        assert not top_level & (WEBUI_PACKAGES | FORGE_PACKAGES), (path, top_level)
        third_party = imported_roots(path) - set(__import__("sys").stdlib_module_names) - {"lib_hires"}
        assert third_party <= SHIPPED_BY_WEBUI | FORGE_PACKAGES | {"fastapi", "modules", "PIL"}, (path, third_party)


def _lib_hires_imports(path: Path) -> set[str]:
    """The ``lib_hires`` modules ``path`` imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("lib_hires"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib_hires"))
    return found


VAE_ORDER = ["layout", "memory", "previews", "shared_norm", "passes"]  # each may import only those before it


def test_vae_package_imports_one_way():
    vae = ROOT / "lib_hires" / "vae"
    assert sorted(p.stem for p in vae.glob("*.py")) == sorted(VAE_ORDER + ["__init__"])
    for k, name in enumerate(VAE_ORDER):
        used = {m.split(".")[2] for m in _lib_hires_imports(vae / f"{name}.py") if m.startswith("lib_hires.vae.")}
        assert used <= set(VAE_ORDER[:k]), (name, used - set(VAE_ORDER[:k]))
        others = {m for m in _lib_hires_imports(vae / f"{name}.py") if not m.startswith("lib_hires.vae")}
        assert not others, (name, others)  # the VAE code stands on torch alone


def test_adapters_use_only_the_vae_packages_public_names():
    import lib_hires.vae as vae

    for path in (ROOT / "lib_hires" / "webui").rglob("*.py"):
        for module in _lib_hires_imports(path):
            if module.startswith("lib_hires.vae"):
                assert module == "lib_hires.vae" or module.split(".")[2] in vae.__all__, (path, module)
