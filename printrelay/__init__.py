def program() -> str:
    """The ``printrelay`` console script of this installation (beside its Python, as in a venv), else the one
    on PATH, else plain ``printrelay``: what printed commands and generated units should run."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "printrelay"
    if beside.is_file():
        return str(beside.absolute())
    found = shutil.which("printrelay")
    return str(Path(found).absolute()) if found else "printrelay"
